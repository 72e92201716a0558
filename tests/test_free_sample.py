"""End-to-end tests of free_sample.py (classifier-free guidance) in both modes on the fixture 64x64 UNet."""

import importlib.util
import os
import shlex

import numpy as np
import pytest

import guided_diffusion  # noqa: F401  (prepares Jittor's environment)
from sampling_helpers import (
    REPO,
    UNET,
    assert_ok,
    assert_user_error,
    load_samples,
    no_samples_npz,
    run_script,
    unet_flags,
)

SCRIPT = "free_sample.py"
COMMON = ["--num_samples", 2, "--batch_size", 2, "--timestep_respacing", "ddim5", "--use_ddim", "True",
          "--class_labels", "3,7", "--seed", 2]


@pytest.fixture(scope="module")
def uncond_path(tmp_path_factory):
    """An unconditional model: the fixture UNet without its label table (same flags, --class_cond False)."""
    from guided_diffusion import checkpoint

    state = checkpoint.load_file(UNET)
    del state["label_emb.weight"]
    path = str(tmp_path_factory.mktemp("uncond") / "uncond.pt")
    checkpoint.save_file(state, path)
    return path


@pytest.fixture(scope="module")
def two_model_runs(tmp_path_factory, uncond_path):
    """Mode (a) with w = -1 (the unconditional model alone), 0 (the conditional model alone) and 2."""
    out = {}
    for w in (-1.0, 0.0, 2.0):
        logdir = tmp_path_factory.mktemp("w%g" % w)
        # no --class_cond: as in the README command, the script builds each model with the right setting
        args = unet_flags(skip=("timestep_respacing", "class_cond")) + [
            "--cmodel_path", UNET, "--ucmodel_path", uncond_path, "--w", w] + COMMON
        assert_ok(run_script(SCRIPT, args, logdir))
        out[w] = load_samples(os.path.join(logdir, "samples_2x64x64x3.npz"))
        out[w]["logdir"] = logdir
    return out


def test_free_sample_two_models_writes_images_labels_and_grid(two_model_runs):
    data = two_model_runs[2.0]
    assert data["arr_0"].dtype == np.uint8 and data["arr_0"].shape == (2, 64, 64, 3)
    assert data["arr_1"].dtype == np.int64 and data["arr_1"].tolist() == [3, 7]
    assert os.path.exists(os.path.join(data["logdir"], "samples_2x64x64x3.png"))


def test_free_sample_guidance_moves_samples_toward_the_conditional_prediction(two_model_runs):
    """From the same noise: w = 2 extrapolates past the conditional sample (w = 0), away from the
    unconditional one (w = -1)."""
    uncond = two_model_runs[-1.0]["arr_0"].astype(np.float64)
    cond = two_model_runs[0.0]["arr_0"].astype(np.float64)
    guided = two_model_runs[2.0]["arr_0"].astype(np.float64)
    assert not np.array_equal(cond, uncond) and not np.array_equal(guided, cond)
    to_cond = (cond - uncond).reshape(2, -1)
    to_guided = (guided - uncond).reshape(2, -1)
    cos = (to_cond * to_guided).sum(1) / np.linalg.norm(to_cond, axis=1) / np.linalg.norm(to_guided, axis=1)
    print("cosine", cos, "norms", np.linalg.norm(to_cond, axis=1), np.linalg.norm(to_guided, axis=1))
    assert (cos > 0.3).all()
    assert (np.linalg.norm(to_guided, axis=1) > np.linalg.norm(to_cond, axis=1)).all()


def test_free_sample_one_model_with_null_label(tmp_path):
    """Mode (b): a free_train.py-style model; the fixture's 1000-row table = 999 classes + the null label."""
    args = unet_flags() + ["--model_path", UNET, "--num_classes", 999, "--w", 1.5] + COMMON
    proc = run_script(SCRIPT, args, tmp_path)
    assert_ok(proc)
    data = load_samples(str(tmp_path / "samples_2x64x64x3.npz"))
    assert data["arr_0"].shape == (2, 64, 64, 3) and data["arr_1"].tolist() == [3, 7]


def test_free_sample_null_label_is_not_a_class(tmp_path):
    args = unet_flags() + ["--model_path", UNET, "--num_classes", 999] + COMMON + ["--class_labels", "999"]
    assert_user_error(run_script(SCRIPT, args, tmp_path), "--class_labels", "0..998")
    assert no_samples_npz(tmp_path)


def test_free_sample_needs_two_models_or_one(tmp_path):
    assert_user_error(run_script(SCRIPT, unet_flags() + ["--cmodel_path", UNET], tmp_path), "--ucmodel_path")
    args = unet_flags() + ["--model_path", UNET, "--cmodel_path", UNET]
    assert_user_error(run_script(SCRIPT, args, tmp_path), "not both")


def test_free_sample_reports_conditional_model_given_as_unconditional(tmp_path):
    args = unet_flags() + ["--cmodel_path", UNET, "--ucmodel_path", UNET] + COMMON
    assert_user_error(run_script(SCRIPT, args, tmp_path), "--ucmodel_path", "label_emb.weight")


def _parser(free_defaults=False):
    spec = importlib.util.spec_from_file_location("free_sample", os.path.join(REPO, SCRIPT))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.create_argparser(free_defaults=free_defaults)


def test_readme_command_parses_to_the_released_256_pair():
    command = ("--attention_resolutions 32,16,8 --image_size 256 --learn_sigma True --noise_schedule linear "
               "--num_channels 256 --num_head_channels 64 --num_res_blocks 2 --resblock_updown True "
               "--use_scale_shift_norm True --cmodel_path /path/to/conditional_model.pt  "
               "--ucmodel_path /path/to/unconditional_model.pt --batch_size 60 --num_samples 10000 "
               "--timestep_respacing ddim25 --use_ddim True --w 3")
    args = _parser().parse_args(shlex.split(command))
    assert args.w == 3.0 and args.use_ddim and args.timestep_respacing == "ddim25"
    assert (args.diffusion_steps, args.channel_mult, args.dropout, args.num_heads_upsample) == (1000, "", 0.0, -1)


def test_help_documents_w():
    text = _parser().format_help()
    assert "--w W" in text and "(1 + w) * eps_cond - w * eps_uncond" in text
