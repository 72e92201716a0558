"""Tests for guided_diffusion.samplers: the one sampler table read by the scripts, the flag help and DiT."""

import argparse
import os

import guided_diffusion  # noqa: F401  (prepares Jittor's environment before jittor is imported)
import jittor as jt
import numpy as np
import pytest

from guided_diffusion import gaussian_diffusion as gd
from guided_diffusion import flag_help, sampling, samplers
from guided_diffusion.errors import UserError
from guided_diffusion.respace import SpacedDiffusion, space_timesteps
from gaussian_data_model import GaussianDataModel

LINEAR = gd.get_named_beta_schedule("linear", 1000)


def test_every_table_entry_names_a_loop_of_gaussian_diffusion():
    assert samplers.SAMPLER_NAMES == ("ddpm", "ddim", "dpm++2m", "dpm++3m", "unipc")
    for spec in samplers.SAMPLERS.values():
        assert callable(getattr(gd.GaussianDiffusion, spec.loop)), spec
        assert spec.name in samplers.sampler_flag_help()
    assert sampling.SAMPLERS is samplers.SAMPLERS  # the scripts' and the demo's table is this one


def test_choice_from_flags_carries_unipc_options_and_names_bad_ones():
    args = argparse.Namespace(sampler="UniPC", use_ddim=False, unipc_order=3, unipc_variant="BH1")
    choice = samplers.choice_from_args(args)
    assert (choice.name, dict(choice.options), choice.label()) == ("unipc", {"order": 3, "variant": "bh1"},
                                                                   "unipc-bh1-3")
    assert samplers.sampler_choice("dpm++2m", unipc_order=3).options == {}
    assert samplers.sampler_choice("", use_ddim=True).name == "ddim"
    with pytest.raises(UserError, match="--unipc_order must be 1, 2 or 3"):
        samplers.sampler_choice("unipc", unipc_order=4)
    with pytest.raises(UserError, match="--unipc-variant must be bh1 or bh2"):
        samplers.sampler_choice("unipc", unipc_variant="bh3", dashed=True)
    with pytest.raises(UserError, match="choose one of ddpm, ddim, dpm\\+\\+2m, dpm\\+\\+3m, unipc"):
        samplers.sampler_choice("heun")


def test_dit_grid_is_log_snr_for_the_ode_solvers_only():
    assert samplers.grid_for_steps("ddpm", 250) == "250"
    assert samplers.grid_for_steps("ddim", 50) == "50"
    assert samplers.grid_for_steps("dpm++3m", 20) == "logsnr20"
    assert samplers.grid_for_steps(samplers.sampler_choice("unipc"), 10) == "logsnr10"


def test_run_sampler_runs_the_named_walk_with_its_options():
    diffusion = SpacedDiffusion(use_timesteps=space_timesteps(1000, "6"), betas=LINEAR,
                                model_mean_type=gd.ModelMeanType.EPSILON, model_var_type=gd.ModelVarType.FIXED_LARGE,
                                loss_type=gd.LossType.MSE)
    model = GaussianDataModel(LINEAR, mu=0.2, std=0.6)
    noise = np.random.RandomState(0).randn(1, 3, 2, 2).astype(np.float32)
    kw = dict(noise=jt.array(noise), clip_denoised=False)
    ours = samplers.run_sampler(diffusion, model, noise.shape, samplers.sampler_choice("unipc", unipc_order=3,
                                                                                        unipc_variant="bh1"), **kw)
    direct = diffusion.unipc_sample_loop(model, noise.shape, order=3, variant="bh1", **kw)
    np.testing.assert_array_equal(ours.numpy(), direct.numpy())
    dpm = samplers.run_sampler(diffusion, model, noise.shape, "dpm++3m", **kw)
    np.testing.assert_array_equal(dpm.numpy(), diffusion.dpm_solver_sample_loop(model, noise.shape, order=3,
                                                                                 **kw).numpy())


def test_new_flags_at_their_defaults_leave_the_recorded_run_config_unchanged():
    # A run begun before --unipc_* and --guidance_* existed resumes with the same command.
    old = dict(sampler="", use_ddim=False, seed=0, w=3.0)
    new = argparse.Namespace(**old, unipc_order=2, unipc_variant="bh2", guidance_interval="", guidance_rescale=0.0)
    assert sampling.sampling_run_config(new) == dict(sorted(old.items()))
    changed = argparse.Namespace(**old, unipc_order=3, unipc_variant="bh2", guidance_interval="0,500",
                                 guidance_rescale=0.0)
    assert sampling.sampling_run_config(changed)["unipc_order"] == 3
    assert sampling.sampling_run_config(changed)["guidance_interval"] == "0,500"


def test_flag_help_describes_the_sampler_and_guidance_flags():
    for flag in ("sampler", "unipc_order", "unipc_variant", "guidance_interval", "guidance_rescale"):
        assert flag in flag_help.FLAG_HELP
    assert "unipc" in flag_help.FLAG_HELP["sampler"]


@pytest.mark.parametrize("script,flags,fix", [
    ("free_sample.py", ["--guidance_interval", "0,2000", "--guidance_rescale", "3"],
     ["--guidance_interval 0,2000", "--guidance_rescale 3"]),
    ("classifier_sample.py", ["--guidance_interval", "5,1", "--sampler", "unipc", "--unipc_order", "4"],
     ["--guidance_interval 5,1", "--unipc_order must be 1, 2 or 3"]),
])
def test_scripts_refuse_bad_sampler_and_guidance_flags_with_the_fix(script, flags, fix):
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, os.path.join(root, script)] + flags, cwd=root, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode != 0
    for text in fix:
        assert text in proc.stderr + proc.stdout, (text, proc.stderr[-2000:])
