"""Tests for DiT's sampler flags (DiT/dit_util.py): read from the one sampler table, checked with their fixes."""

import argparse
import os
import sys

import guided_diffusion  # noqa: F401  (prepares Jittor before it is imported)
import pytest

from guided_diffusion.errors import InputCheck, UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "DiT"))

import dit_util  # noqa: E402


def _args(*argv):
    parser = argparse.ArgumentParser()
    dit_util.add_sampler_flags(parser)
    parser.add_argument("--cfg-scale", type=float, default=4.0)
    parser.add_argument("--guide-all-channels", action="store_true")
    return parser.parse_args(list(argv))


def test_defaults_are_the_reference_ddpm_with_guidance_everywhere():
    args = _args()
    assert dit_util.sampling_spacing(args) == "250"
    assert dit_util.cfg_kwargs(args) == dict(cfg_scale=4.0, guide_all_channels=False, guidance_interval=None,
                                             guidance_rescale=0.0)


def test_unipc_takes_its_options_and_the_log_snr_grid():
    args = _args("--sampler", "unipc", "--unipc-order", "3", "--unipc-variant", "bh1", "--num-sampling-steps", "10",
                 "--guidance-interval", "0,700", "--guidance-rescale", "0.7")
    choice = dit_util.sampler_choice(args)
    assert (choice.name, dict(choice.options)) == ("unipc", {"order": 3, "variant": "bh1"})
    assert dit_util.sampling_spacing(args) == "logsnr10"
    assert dit_util.cfg_kwargs(args)["guidance_interval"] == (0, 700)
    assert dit_util.cfg_kwargs(args)["guidance_rescale"] == 0.7


def test_bad_sampler_flags_are_named_with_their_dashed_names():
    check = InputCheck()
    dit_util.check_sampling_flags(check, _args("--sampler", "unipc", "--unipc-order", "5", "--guidance-interval",
                                               "900,100", "--guidance-rescale", "2"))
    with pytest.raises(UserError) as err:
        check.done()
    for fix in ("--unipc-order must be 1, 2 or 3", "--guidance-interval 900,100", "--guidance-rescale 2"):
        assert fix in str(err.value)


def test_model_config_equals_what_every_registry_entry_builds_without_building_it():
    from unittest import mock

    import models

    for name, factory in models.DiT_models.items():
        with mock.patch.object(models, "DiT", dict):  # the factory's arguments instead of a network
            built = factory()
        assert dit_util.model_config(name) == built, name
    assert dit_util.model_config("DiT-XL/2") == {"depth": 28, "hidden_size": 1152, "patch_size": 2, "num_heads": 16}
    with pytest.raises(UserError, match="unknown --model"):
        dit_util.model_config("DiT-Q/3")
