"""End-to-end tests of free_train.py (subprocess) on tiny CIFAR-format batches."""

import os
import signal

import numpy as np

from guided_diffusion.checkpoint import load_file
from test_cifar10 import write_cifar_batches
from test_image_train import run_script
from training_helpers import script_cmd, stop_and_continue, training_env

TINY = ["--image_size", "32", "--num_channels", "16", "--num_res_blocks", "1", "--channel_mult", "1,2",
        "--attention_resolutions", "16", "--num_heads", "1", "--diffusion_steps", "50"]


def test_free_train_trains_on_cifar_batches_with_a_null_label_row_reproducibly(tmp_path):
    write_cifar_batches(tmp_path / "cifar" / "cifar-10-batches-py", n_per_batch=2)
    runs = {}
    for name, seed in (("log", 0), ("again", 0), ("other", 1)):
        proc = run_script(["--data_dir", tmp_path / "cifar", "--batch_size", "4", "--lr_anneal_steps", "2",
                           "--save_interval", "1", "--log_interval", "1", "--p_uncond", "0.5", "--seed", seed]
                          + TINY, tmp_path / name, script="free_train.py")
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = load_file(str(tmp_path / name / "model000002.pt"))
    sd = runs["log"]
    assert sd["label_emb.weight"].shape == (11, 64)  # 10 classes + the null label
    assert "ema_0.9999_000002.pt" in os.listdir(tmp_path / "log")
    assert "| loss " in (tmp_path / "log" / "log.txt").read_text()
    for k in sd:  # the same command and seed: the same run, initial weights included
        np.testing.assert_array_equal(sd[k], runs["again"][k], err_msg=k)
    assert np.abs(sd["input_blocks.0.0.weight"] - runs["other"]["input_blocks.0.0.weight"]).max() > 0.05


def test_free_train_honours_num_classes_with_an_image_folder(tmp_path):
    from test_image_train import make_images

    data = make_images(tmp_path / "imgs", n=4)  # classes c0, c1
    proc = run_script(["--data_dir", data, "--batch_size", "2", "--lr_anneal_steps", "1", "--num_classes", "2"]
                      + TINY, tmp_path / "log", script="free_train.py")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert load_file(str(tmp_path / "log" / "model000001.pt"))["label_emb.weight"].shape == (3, 64)
    bad = run_script(["--data_dir", data, "--batch_size", "2", "--lr_anneal_steps", "1", "--class_cond", "False"]
                     + TINY, tmp_path / "log2", script="free_train.py")
    assert bad.returncode == 2 and "class_cond" in bad.stderr


def test_free_train_defaults_are_a_cifar10_setup(tmp_path):
    proc = run_script(["--help"], tmp_path / "log", script="free_train.py")
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())
    assert "./data/cifar10" in text and "--p_uncond" in text and "default: 0.1)" in text
    assert "--num_classes" in text and "default: 10)" in text


def test_sigterm_saves_a_whole_set_and_a_rerun_ends_with_the_uninterrupted_weights(tmp_path):
    steps = 30
    write_cifar_batches(tmp_path / "cifar" / "cifar-10-batches-py", n_per_batch=2)
    cmd = script_cmd("free_train.py", ["--data_dir", tmp_path / "cifar", "--batch_size", 2, "--lr_anneal_steps",
                                       steps, "--save_interval", 1000, "--log_interval", 1, "--p_uncond", 0.5]
                     + TINY)
    out = stop_and_continue(
        lambda d: cmd, lambda d: training_env(d), signum=signal.SIGTERM, run_dir=tmp_path / "run",
        full_dir=tmp_path / "full", log_file="log.txt", logged_step=r"\|\s*step\s*\|\s*2 ",
        final_files=["model%06d.pt" % steps, "ema_0.9999_%06d.pt" % steps],
        set_files=lambda s: ["ema_0.9999_%06d.pt" % s, "opt%06d.pt" % s, "model%06d.pt" % s])
    print("SIGTERM after step %d; worst relative difference: %g" % (out["step"], out["worst_relative_difference"]))
    assert 3 <= out["step"] < steps and out["worst_relative_difference"] == 0.0
