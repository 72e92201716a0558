"""End-to-end tests of image_train.py (run as a subprocess, as users run it)."""

import os
import subprocess
import sys

import numpy as np
from PIL import Image

from guided_diffusion.checkpoint import load_file, load_state_dict_strict
from guided_diffusion.script_util import create_model_and_diffusion, model_and_diffusion_defaults

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--image_size", "32", "--num_channels", "16", "--num_res_blocks", "1", "--channel_mult", "1,2",
        "--attention_resolutions", "16", "--diffusion_steps", "50", "--class_cond", "True", "--learn_sigma", "True"]


def make_images(folder, n=4):
    rng = np.random.RandomState(0)
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.randint(0, 256, (36, 40, 3), dtype=np.uint8)).save(
            os.path.join(folder, "c%d_%d.png" % (i % 2, i)))
    return str(folder)


def run_script(args, logdir, script="image_train.py"):
    env = dict(os.environ, OPENAI_LOGDIR=str(logdir))
    env.pop("DIFFUSION_TRAINING_TEST", None)
    return subprocess.run([sys.executable, os.path.join(REPO, script)] + [str(a) for a in args],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=600)


def test_image_train_saves_resumes_exactly_and_keeps_the_resumed_checkpoint(tmp_path):
    data = make_images(tmp_path / "imgs")
    common = ["--data_dir", data, "--batch_size", "2", "--lr_anneal_steps", "2", "--save_interval", "1",
              "--log_interval", "1", "--ema_rate", "0.9999,0.9"] + TINY
    first = run_script(common, tmp_path / "a")
    assert first.returncode == 0, first.stderr[-3000:]
    names = set(os.listdir(tmp_path / "a"))
    assert {"model000001.pt", "model000002.pt", "ema_0.9999_000002.pt", "ema_0.9_000002.pt", "opt000002.pt",
            "log.txt", "progress.csv"} <= names
    assert "model000000.pt" not in names
    resumed_from = (tmp_path / "a" / "model000001.pt").read_bytes()

    second = run_script(common + ["--resume_checkpoint", tmp_path / "a" / "model000001.pt"], tmp_path / "b")
    assert second.returncode == 0, second.stderr[-3000:]
    assert (tmp_path / "a" / "model000001.pt").read_bytes() == resumed_from
    for name in ("model000002.pt", "ema_0.9999_000002.pt", "ema_0.9_000002.pt"):
        a, b = load_file(str(tmp_path / "a" / name)), load_file(str(tmp_path / "b" / name))
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=name + ":" + k)
    log = (tmp_path / "a" / "log.txt").read_text()
    for key in ("| step ", "| samples ", "| loss ", "| mse ", "| vb ", "| loss_q", "| grad_norm ", "| param_norm "):
        assert key in log, key

    # the checkpoint loads into the model that the sampling scripts build from the same flags
    flags = model_and_diffusion_defaults()
    flags.update(image_size=32, num_channels=16, num_res_blocks=1, channel_mult="1,2", attention_resolutions="16",
                 diffusion_steps=50, class_cond=True, learn_sigma=True)
    model, _ = create_model_and_diffusion(**flags)
    load_state_dict_strict(model, load_file(str(tmp_path / "b" / "ema_0.9999_000002.pt")))


def test_image_train_reports_a_missing_data_dir_clearly(tmp_path):
    proc = run_script(["--data_dir", tmp_path / "missing"] + TINY, tmp_path / "log")
    assert proc.returncode == 2
    assert "error:" in proc.stderr and "missing" in proc.stderr and "Traceback" not in proc.stderr


def test_image_train_help_lists_the_reference_flags_with_defaults(tmp_path):
    proc = run_script(["--help"], tmp_path / "log")
    assert proc.returncode == 0
    for flag in ("--data_dir", "--schedule_sampler", "--lr ", "--weight_decay", "--lr_anneal_steps", "--batch_size",
                 "--microbatch", "--ema_rate", "--log_interval", "--save_interval", "--resume_checkpoint",
                 "--use_fp16", "--fp16_scale_growth", "--num_channels", "--learn_sigma"):
        assert flag in proc.stdout, flag
    assert "default: 0.0001" in proc.stdout
