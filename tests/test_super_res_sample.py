"""End-to-end test of scripts/super_res_sample.py with a tiny 32->64 super-resolution model."""

import os

import numpy as np
import pytest

import guided_diffusion  # noqa: F401
from sampling_helpers import assert_ok, assert_user_error, load_samples, no_samples_npz, run_script

SCRIPT = "scripts/super_res_sample.py"
SR_FLAGS = ["--large_size", 64, "--small_size", 32, "--num_channels", 32, "--num_res_blocks", 1,
            "--attention_resolutions", "8", "--learn_sigma", "True", "--resblock_updown", "True"]


@pytest.fixture(scope="module")
def sr_model(tmp_path_factory):
    """A model built by sr_create_model_and_diffusion from SR_FLAGS, with seeded random weights.

    (The fixture superres_32to64.pt uses channel_mult 1,2,2, which the sr flags cannot express.)"""
    from guided_diffusion import checkpoint, script_util, state_dicts

    kw = script_util.sr_model_and_diffusion_defaults()
    kw.update(large_size=64, small_size=32, num_channels=32, num_res_blocks=1, attention_resolutions="8",
              learn_sigma=True, resblock_updown=True)
    model, _ = script_util.sr_create_model_and_diffusion(**kw)
    rng = np.random.RandomState(0)
    state = {k: (v + rng.randn(*v.shape) * 0.02).astype(np.float32)
             for k, v in state_dicts.module_state_dict(model).items()}
    path = str(tmp_path_factory.mktemp("sr") / "sr.pt")
    checkpoint.save_file(state, path)
    return path


@pytest.fixture
def base_samples(tmp_path):
    images = np.random.RandomState(0).randint(0, 256, size=(3, 32, 32, 3)).astype(np.uint8)
    path = str(tmp_path / "base.npz")
    np.savez(path, images, np.array([1, 2, 3]))
    return path


def test_super_res_sample_upsamples_base_samples(tmp_path, sr_model, base_samples):
    args = SR_FLAGS + ["--model_path", sr_model, "--base_samples", base_samples, "--num_samples", 4,
                       "--batch_size", 2, "--timestep_respacing", "ddim5", "--use_ddim", "True"]
    assert_ok(run_script(SCRIPT, args, tmp_path))
    data = load_samples(str(tmp_path / "samples_4x64x64x3.npz"))
    assert list(data) == ["arr_0"]  # as the reference: images only
    assert data["arr_0"].dtype == np.uint8 and data["arr_0"].shape == (4, 64, 64, 3)
    assert not np.array_equal(data["arr_0"][0], data["arr_0"][1])
    assert os.path.exists(tmp_path / "samples_4x64x64x3.png")


def test_super_res_sample_checks_base_sample_size(tmp_path, sr_model, base_samples):
    args = SR_FLAGS + ["--small_size", 16, "--model_path", sr_model, "--base_samples", base_samples]
    assert_user_error(run_script(SCRIPT, args, tmp_path), "--base_samples", "--small_size")
    assert no_samples_npz(tmp_path)


def test_super_res_sample_needs_labels_for_class_cond(tmp_path, sr_model):
    path = str(tmp_path / "nolabels.npz")
    np.savez(path, np.zeros((2, 32, 32, 3), np.uint8))
    args = SR_FLAGS + ["--class_cond", "True", "--model_path", sr_model, "--base_samples", path]
    assert_user_error(run_script(SCRIPT, args, tmp_path), "no labels (arr_1)")
