"""End-to-end tests of classifier_train.py (subprocess): noised training, validation logs, resume."""

import csv
import os
import signal

import numpy as np

from guided_diffusion.checkpoint import load_file
from guided_diffusion.state_dicts import load_state_dict_strict
from guided_diffusion.script_util import classifier_defaults, create_classifier
from test_image_train import make_images, run_script
from training_helpers import script_cmd, stop_and_continue, training_env

TINY = ["--image_size", "64", "--classifier_width", "16", "--classifier_depth", "1",
        "--classifier_attention_resolutions", "8", "--diffusion_steps", "50"]


def _columns(path):
    with open(path) as f:
        return next(csv.reader(f))


def test_classifier_train_learns_on_noised_inputs_with_validation_and_resumes(tmp_path):
    train_dir = make_images(tmp_path / "train", n=4)
    val_dir = make_images(tmp_path / "val", n=2)
    common = ["--data_dir", train_dir, "--val_data_dir", val_dir, "--batch_size", "2", "--iterations", "3",
              "--save_interval", "2", "--log_interval", "1", "--eval_interval", "1", "--anneal_lr", "True",
              "--weight_decay", "0.05"] + TINY
    first = run_script(common, tmp_path / "a", script="classifier_train.py")
    assert first.returncode == 0, first.stderr[-3000:]
    assert {"model000002.pt", "opt000002.pt", "model000003.pt", "opt000003.pt"} <= set(os.listdir(tmp_path / "a"))
    cols = _columns(tmp_path / "a" / "progress.csv")
    for key in ("step", "samples", "train_loss", "train_acc@1", "train_acc@5", "val_loss", "val_acc@1",
                "val_acc@5", "grad_norm", "param_norm"):
        assert key in cols, key
    # noised inputs: timesteps spread over the diffusion process (not only t = 0, the first quartile)
    assert any(c.startswith("train_loss_q") and c != "train_loss_q0" for c in cols)

    second = run_script(common + ["--resume_checkpoint", tmp_path / "a" / "model000002.pt"], tmp_path / "b",
                        script="classifier_train.py")
    assert second.returncode == 0, second.stderr[-3000:]
    a, b = load_file(str(tmp_path / "a" / "model000003.pt")), load_file(str(tmp_path / "b" / "model000003.pt"))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    # a fresh run of the same command (same --seed) is the same run: initial weights included
    again = run_script(common, tmp_path / "c", script="classifier_train.py")
    assert again.returncode == 0, again.stderr[-3000:]
    c = load_file(str(tmp_path / "c" / "model000003.pt"))
    for k in a:
        np.testing.assert_array_equal(a[k], c[k], err_msg=k)
    # loads into the classifier the sampling scripts build from the same flags
    flags = classifier_defaults()
    flags.update(image_size=64, classifier_width=16, classifier_depth=1, classifier_attention_resolutions="8")
    load_state_dict_strict(create_classifier(**flags), b)


def test_classifier_train_resume_without_optimizer_state_is_a_clear_error(tmp_path):
    train_dir = make_images(tmp_path / "train", n=2)
    first = run_script(["--data_dir", train_dir, "--batch_size", "2", "--iterations", "1", "--noised", "False"]
                       + TINY, tmp_path / "a", script="classifier_train.py")
    assert first.returncode == 0, first.stderr[-3000:]
    cols = _columns(tmp_path / "a" / "progress.csv")
    assert "train_loss_q0" in cols and not any(c.startswith("train_loss_q") and c != "train_loss_q0" for c in cols)
    os.remove(tmp_path / "a" / "opt000001.pt")
    proc = run_script(["--data_dir", train_dir, "--batch_size", "2", "--iterations", "2",
                       "--resume_checkpoint", tmp_path / "a" / "model000001.pt"] + TINY, tmp_path / "b",
                      script="classifier_train.py")
    assert proc.returncode == 2 and "opt000001.pt" in proc.stderr and "Traceback" not in proc.stderr


def test_sigint_saves_model_and_optimizer_exits_130_and_a_rerun_ends_with_the_uninterrupted_weights(tmp_path):
    steps = 30
    data = make_images(tmp_path / "train", n=4)
    cmd = script_cmd("classifier_train.py", ["--data_dir", data, "--batch_size", 2, "--iterations", steps,
                                             "--save_interval", 1000, "--log_interval", 1] + TINY)
    out = stop_and_continue(
        lambda d: cmd, lambda d: training_env(d), signum=signal.SIGINT, run_dir=tmp_path / "run",
        full_dir=tmp_path / "full", log_file="log.txt", logged_step=r"\|\s*step\s*\|\s*2 ",
        final_files=["model%06d.pt" % steps], set_files=lambda s: ["opt%06d.pt" % s, "model%06d.pt" % s])
    print("SIGINT after step %d; worst relative difference: %g" % (out["step"], out["worst_relative_difference"]))
    assert 3 <= out["step"] < steps and out["worst_relative_difference"] == 0.0
