"""End-to-end tests of scripts/super_res_train.py (subprocess): a few steps, then an exact resume."""

import os
import signal

import numpy as np
from PIL import Image

from guided_diffusion.checkpoint import load_file
from guided_diffusion.state_dicts import load_state_dict_strict
from guided_diffusion.script_util import sr_create_model_and_diffusion, sr_model_and_diffusion_defaults
from test_image_train import make_images, run_script
from training_helpers import script_cmd, stop_and_continue, training_env

TINY = ["--large_size", "64", "--small_size", "32", "--num_channels", "16", "--num_res_blocks", "1",
        "--attention_resolutions", "8", "--diffusion_steps", "50"]


def test_super_res_train_trains_and_resumes_exactly(tmp_path):
    data = make_images(tmp_path / "imgs", n=2)
    common = ["--data_dir", data, "--batch_size", "2", "--lr_anneal_steps", "2", "--save_interval", "1",
              "--log_interval", "1"] + TINY
    first = run_script(common, tmp_path / "a", script="scripts/super_res_train.py")
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_script(common + ["--resume_checkpoint", tmp_path / "a" / "model000001.pt"], tmp_path / "b",
                        script="scripts/super_res_train.py")
    assert second.returncode == 0, second.stderr[-3000:]
    assert sorted(f for f in os.listdir(tmp_path / "b") if f.endswith(".pt")) == [
        "ema_0.9999_000002.pt", "model000002.pt", "opt000002.pt"]
    a, b = load_file(str(tmp_path / "a" / "model000002.pt")), load_file(str(tmp_path / "b" / "model000002.pt"))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    # a fresh run of the same command (same --seed) is the same run: initial weights included, and previews
    # (each low-resolution input beside its sample) change nothing in it
    again = run_script(common + ["--preview_interval", "1"], tmp_path / "c", script="scripts/super_res_train.py")
    assert again.returncode == 0, again.stderr[-3000:]
    c = load_file(str(tmp_path / "c" / "model000002.pt"))
    for k in a:
        np.testing.assert_array_equal(a[k], c[k], err_msg=k)
    for step in (1, 2):
        grid = np.asarray(Image.open(str(tmp_path / "c" / ("preview_%06d.png" % step))))
        assert grid.shape == (2 + 66, 2 + 4 * 66, 3)  # 2 images: input, sample, input, sample
        assert grid[2:66, 2:66].std() > 0  # the upsampled low-resolution input of the first image
    assert "preview after step 2:" in (tmp_path / "c" / "log.txt").read_text()
    flags = sr_model_and_diffusion_defaults()
    flags.update(large_size=64, small_size=32, num_channels=16, num_res_blocks=1, attention_resolutions="8",
                 diffusion_steps=50)
    model, _ = sr_create_model_and_diffusion(**flags)
    load_state_dict_strict(model, b)


def test_super_res_model_trained_by_the_script_samples_with_super_res_sample(tmp_path):
    data = make_images(tmp_path / "imgs", n=2)
    train = run_script(["--data_dir", data, "--batch_size", "2", "--lr_anneal_steps", "2", "--save_interval", "2",
                        "--log_interval", "1"] + TINY, tmp_path / "train", script="scripts/super_res_train.py")
    assert train.returncode == 0, train.stderr[-3000:]
    base = tmp_path / "base.npz"
    np.savez(str(base), np.random.RandomState(1).randint(0, 256, size=(2, 32, 32, 3)).astype(np.uint8))
    sample = run_script(TINY + ["--model_path", tmp_path / "train" / "ema_0.9999_000002.pt", "--base_samples", base,
                                "--num_samples", "2", "--batch_size", "2", "--timestep_respacing", "ddim4",
                                "--use_ddim", "True"], tmp_path / "sample", script="scripts/super_res_sample.py")
    assert sample.returncode == 0, sample.stderr[-3000:]
    with np.load(str(tmp_path / "sample" / "samples_2x64x64x3.npz")) as out:
        assert out["arr_0"].shape == (2, 64, 64, 3) and out["arr_0"].dtype == np.uint8


def test_sigterm_saves_a_whole_set_and_a_rerun_ends_with_the_uninterrupted_weights(tmp_path):
    steps = 24
    data = make_images(tmp_path / "imgs", n=2)
    cmd = script_cmd("scripts/super_res_train.py", ["--data_dir", data, "--batch_size", 2, "--lr_anneal_steps",
                                                    steps, "--save_interval", 1000, "--log_interval", 1] + TINY)
    out = stop_and_continue(
        lambda d: cmd, lambda d: training_env(d), signum=signal.SIGTERM, run_dir=tmp_path / "run",
        full_dir=tmp_path / "full", log_file="log.txt", logged_step=r"\|\s*step\s*\|\s*2 ",
        final_files=["model%06d.pt" % steps, "ema_0.9999_%06d.pt" % steps],
        set_files=lambda s: ["ema_0.9999_%06d.pt" % s, "opt%06d.pt" % s, "model%06d.pt" % s])
    print("SIGTERM after step %d; worst relative difference: %g" % (out["step"], out["worst_relative_difference"]))
    assert 3 <= out["step"] < steps and out["worst_relative_difference"] == 0.0
