"""DiT entry scripts end to end on a tiny model and the tiny VAE fixture: train (+resume), sample, sample_ddp,
the README's flags, download.find_model."""

import argparse
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import guided_diffusion  # noqa: F401  (prepares Jittor before it is imported)
import jittor as jt  # noqa: F401

from guided_diffusion.checkpoint import load_file, save_file
from guided_diffusion.errors import CheckpointError, DownloadError
from training_helpers import stop_and_continue, training_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIT = os.path.join(ROOT, "DiT")
sys.path.insert(0, DIT)
FIX = os.path.join(ROOT, "tests", "fixtures", "dit")
VAE_DIR = os.path.join(FIX, "vae_tiny")
TINY_CKPT = os.path.join(FIX, "dit_tiny_p4.pt")
# DiT-S/4 shrunk to the fixture's size: patch 4, depth 2, hidden 64, 4 heads; 32 px images -> 16x16 latents.
TINY_MODEL = ["--model", "DiT-S/4", "--depth", "2", "--hidden-size", "64", "--num-heads", "4",
              "--image-size", "32", "--vae-path", VAE_DIR]

import download  # noqa: E402


def _run(script, args, cwd, expect_ok=True):
    env = dict(os.environ, OPENAI_LOGDIR=os.path.join(str(cwd), "logs"))
    proc = subprocess.run([sys.executable, os.path.join(DIT, script)] + list(args), cwd=str(cwd), env=env,
                          capture_output=True, text=True, timeout=600)
    if expect_ok:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _image_folder(root, per_class=2):
    rng = np.random.RandomState(0)
    for cls in ("cat", "dog"):
        os.makedirs(os.path.join(root, cls), exist_ok=True)
        for i in range(per_class):
            arr = rng.randint(0, 255, size=(40, 48, 3), dtype=np.uint8)
            Image.fromarray(arr).save(os.path.join(root, cls, "%d.png" % i))
    return root


def _logged_losses(log_path):
    with open(log_path) as f:
        text = f.read()
    return {int(m.group(1)): float(m.group(2))
            for m in re.finditer(r"\(step=(\d{7})\) Train Loss: ([0-9.na]+), Train Steps/Sec: [0-9.]+", text)}


def test_train_writes_checkpoints_and_resumes_exactly(tmp_path):
    data = _image_folder(str(tmp_path / "data"))
    common = TINY_MODEL + ["--num-classes", "2", "--data-path", data, "--batch-size", "2",
                           "--results-dir", "res", "--log-every", "1", "--ckpt-every", "1"]
    _run("train.py", common + ["--epochs", "1"], tmp_path)
    run0 = tmp_path / "res" / "000-DiT-S-4"
    assert sorted(os.listdir(run0 / "checkpoints")) == ["0000001.pt", "0000002.pt"]
    losses = _logged_losses(run0 / "log.txt")
    assert sorted(losses) == [1, 2] and all(np.isfinite(v) for v in losses.values())
    ckpt = load_file(str(run0 / "checkpoints" / "0000002.pt"))
    assert set(ckpt) == {"model", "ema", "opt", "args"}
    assert isinstance(ckpt["args"], argparse.Namespace) and ckpt["args"].global_batch_size == 2
    assert ckpt["model"]["pos_embed"].shape == (1, 16, 64)
    assert not np.array_equal(ckpt["model"]["final_layer.linear.weight"], ckpt["ema"]["final_layer.linear.weight"])

    # Resuming from step 1 (a later checkpoint exists, so a new run folder is used, nothing is overwritten)
    # reproduces step 2 of the uninterrupted run.
    before = (run0 / "checkpoints" / "0000002.pt").read_bytes()
    _run("train.py", common + ["--epochs", "1", "--resume", str(run0 / "checkpoints" / "0000001.pt")], tmp_path)
    run1 = tmp_path / "res" / "001-DiT-S-4"
    assert (run0 / "checkpoints" / "0000002.pt").read_bytes() == before
    assert _logged_losses(run1 / "log.txt") == {2: losses[2]}
    resumed = load_file(str(run1 / "checkpoints" / "0000002.pt"))
    for key in ("model", "ema"):
        for name, value in ckpt[key].items():
            np.testing.assert_array_equal(resumed[key][name], value, err_msg=name)

    # a fresh run of the same command (same --global-seed, another --results-dir) is the same run, initial weights
    # included, and previews change nothing in it; another seed is another run
    fresh = [a if a != "res" else "fresh" for a in common]
    _run("train.py", fresh + ["--epochs", "1", "--preview-every", "1"], tmp_path)
    for step in (1, 2):  # a row per class (2), 4 columns of 32 px images
        grid = np.asarray(Image.open(str(tmp_path / "fresh" / "000-DiT-S-4" / ("preview_%06d.png" % step))))
        assert grid.shape == (2 + 2 * 34, 2 + 4 * 34, 3)
    assert "preview after step 2:" in (tmp_path / "fresh" / "000-DiT-S-4" / "log.txt").read_text()
    _run("train.py", fresh + ["--epochs", "1", "--global-seed", "1"], tmp_path)
    again = load_file(str(tmp_path / "fresh" / "000-DiT-S-4" / "checkpoints" / "0000002.pt"))
    other = load_file(str(tmp_path / "fresh" / "001-DiT-S-4" / "checkpoints" / "0000002.pt"))
    for name, value in ckpt["model"].items():
        np.testing.assert_array_equal(again["model"][name], value, err_msg=name)
    assert np.abs(other["model"]["x_embedder.proj.weight"] - ckpt["model"]["x_embedder.proj.weight"]).max() > 0.01


def test_train_accepts_the_readme_command_flags():
    import train

    cmd = ("--model DiT-XL/2 --data-path ./imagenet --image-size 256 --batch-size 128 --epochs 300 "
           "--num-workers 4 --global-seed 0 --results-dir ./res_dir").split()
    args = train.create_argparser().parse_args(cmd)
    assert (args.model, args.global_batch_size, args.epochs, args.results_dir) == ("DiT-XL/2", 128, 300, "./res_dir")
    assert args.vae == "ema" and args.vae_path is None and args.ckpt_every == 50_000 and args.log_every == 100


def test_train_without_class_folders_reports_the_layout(tmp_path):
    (tmp_path / "flat").mkdir()
    proc = _run("train.py", TINY_MODEL + ["--data-path", str(tmp_path / "flat")], tmp_path, expect_ok=False)
    assert proc.returncode == 2 and "error:" in proc.stderr and "class" in proc.stderr


def test_sample_writes_a_grid_of_eight_images(tmp_path):
    _run("sample.py", TINY_MODEL + ["--ckpt", TINY_CKPT, "--num-sampling-steps", "2", "--seed", "1"], tmp_path)
    with Image.open(tmp_path / "sample.png") as im:
        assert im.size == (2 + 4 * (32 + 2), 2 + 2 * (32 + 2))  # 2 rows of 4, padding 2 (torchvision's layout)
        arr = np.asarray(im.convert("RGB"))
    assert arr[2:34, 2:34].std() > 0


def test_sample_with_a_missing_vae_folder_says_what_to_place(tmp_path):
    args = TINY_MODEL[:-1] + [str(tmp_path / "no_vae"), "--ckpt", TINY_CKPT, "--num-sampling-steps", "2"]
    proc = _run("sample.py", args, tmp_path, expect_ok=False)
    assert proc.returncode == 2
    assert "error:" in proc.stderr and "no_vae" in proc.stderr and "config.json" in proc.stderr


def test_sample_names_a_missing_checkpoint_and_the_missing_vae_folder_together(tmp_path):
    proc = _run("sample.py", ["--ckpt", str(tmp_path / "nonexistent" / "dit.pt")], tmp_path, expect_ok=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    message = proc.stderr[proc.stderr.index("error: "):]
    assert "2 problems" in message and "nonexistent" in message and "--ckpt" in message
    assert "sd-vae-ft-mse" in message and "config.json" in message
    assert not (tmp_path / "stabilityai").exists()  # nothing was downloaded or created


def test_train_names_every_input_problem_at_once(tmp_path):
    args = ["--model", "DiT-S/4", "--image-size", "31", "--vae-path", VAE_DIR, "--data-path",
            str(tmp_path / "missing"), "--log-every", "0", "--resume", str(tmp_path / "nope.pt")]
    proc = _run("train.py", args, tmp_path, expect_ok=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    message = proc.stderr[proc.stderr.index("error: "):]
    for fragment in ("4 problems", "--log-every", "--resume", "--data-path", "--image-size 31"):
        assert fragment in message, (fragment, message)


def test_default_vae_is_fetched_into_stabilityai_and_offline_says_where(tmp_path, monkeypatch):
    import requests

    import dit_util
    from guided_diffusion import download as gd_download

    def offline(*args, **kwargs):
        raise requests.ConnectionError("no network")

    monkeypatch.setattr(gd_download.requests, "get", offline)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DownloadError) as info:
        dit_util.load_vae(argparse.Namespace(vae="mse", vae_path=None))
    msg = str(info.value)
    assert "https://huggingface.co/stabilityai/sd-vae-ft-mse/resolve/main/config.json" in msg
    assert os.path.join(str(tmp_path), "stabilityai", "sd-vae-ft-mse") in msg


def test_sample_ddp_writes_the_evaluator_npz(tmp_path):
    _run("sample_ddp.py", TINY_MODEL + ["--ckpt", TINY_CKPT, "--num-sampling-steps", "2", "--num-fid-samples", "3",
                                        "--per-proc-batch-size", "2", "--global-seed", "3"], tmp_path)
    folder = tmp_path / "samples" / "DiT-S-4-dit_tiny_p4-size-32-vae-ema-cfg-1.5-seed-3"
    with np.load(str(folder) + ".npz") as npz:
        images, labels = npz["arr_0"], npz["arr_1"]
    assert images.shape == (3, 32, 32, 3) and images.dtype == np.uint8
    assert labels.shape == (3,) and labels.min() >= 0 and labels.max() < 1000
    assert os.path.samefile(str(folder) + ".npz", str(folder / "samples_3x32x32x3.npz"))
    # DPM-Solver++ with classifier-free guidance, in a folder of its own; the same labels (seeded per batch)
    _run("sample_ddp.py", TINY_MODEL + ["--ckpt", TINY_CKPT, "--num-sampling-steps", "3", "--num-fid-samples", "3",
                                        "--per-proc-batch-size", "2", "--global-seed", "3", "--sampler", "dpm++2m"],
         tmp_path)
    with np.load(str(folder) + "-dpm++2m-3.npz") as npz:
        assert npz["arr_0"].shape == (3, 32, 32, 3) and npz["arr_1"].tolist() == labels.tolist()
        assert not np.array_equal(npz["arr_0"], images)


def test_sampling_a_checkpoint_of_train_py_uses_the_classes_json_of_its_experiment_folder(tmp_path):
    experiment = tmp_path / "results" / "000-DiT-S-4"
    os.makedirs(str(experiment / "checkpoints"))
    ckpt = str(experiment / "checkpoints" / "0000001.pt")
    save_file(load_file(TINY_CKPT), ckpt)
    (experiment / "classes.json").write_text('["cat", "dog", "fox"]\n')
    _run("sample.py", TINY_MODEL + ["--ckpt", ckpt, "--num-sampling-steps", "2", "--class-labels", "fox,dog,cat,0"],
         tmp_path)
    with Image.open(tmp_path / "sample.png") as im:
        assert im.size == (2 + 4 * 34, 2 + 34)  # the four asked for, in one row
    proc = _run("sample.py", TINY_MODEL + ["--ckpt", ckpt, "--class-labels", "fish"], tmp_path, expect_ok=False)
    assert proc.returncode == 2 and "--class-labels" in proc.stderr and "cat, dog, fox" in proc.stderr
    proc = _run("sample_ddp.py", TINY_MODEL + ["--ckpt", ckpt, "--num-sampling-steps", "2", "--num-fid-samples", "8",
                                               "--per-proc-batch-size", "4", "--cfg-scale", "1"], tmp_path)
    assert "class labels are drawn from 3 classes" in proc.stdout
    with np.load(str(tmp_path / "samples" / "DiT-S-4-0000001-size-32-vae-ema-cfg-1.0-seed-0.npz")) as npz:
        assert npz["arr_1"].shape == (8,) and set(npz["arr_1"].tolist()) <= {0, 1, 2}


def test_find_model_returns_the_ema_of_a_training_checkpoint(tmp_path):
    ema = {"w": np.ones((2, 2), np.float32)}
    path = str(tmp_path / "0000010.pt")
    save_file({"model": {"w": np.zeros((2, 2), np.float32)}, "ema": ema, "opt": {}, "args": argparse.Namespace()},
              path)
    np.testing.assert_array_equal(download.find_model(path)["w"], ema["w"])
    assert "x_embedder.proj.weight" in download.find_model(TINY_CKPT)
    with pytest.raises(CheckpointError, match="could not find DiT checkpoint"):
        download.find_model(str(tmp_path / "nope.pt"))


def test_offline_download_names_the_url_and_the_place(tmp_path, monkeypatch):
    import requests

    from guided_diffusion import download as gd_download

    def offline(*args, **kwargs):
        raise requests.ConnectionError("no network")

    monkeypatch.setattr(gd_download.requests, "get", offline)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DownloadError) as info:
        download.find_model("./pretrained_models/DiT-XL-2-256x256.pt")
    msg = str(info.value)
    assert "https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-256x256.pt" in msg
    assert os.path.join(str(tmp_path), "pretrained_models", "DiT-XL-2-256x256.pt") in msg
    assert not (tmp_path / "pretrained_models" / "DiT-XL-2-256x256.pt").exists()


def test_train_sigterm_saves_a_checkpoint_exits_143_and_a_rerun_ends_with_the_uninterrupted_weights(tmp_path):
    data = _image_folder(str(tmp_path / "data"), per_class=12)  # 24 images, 12 steps per epoch at batch 2
    cmd = [sys.executable, os.path.join(DIT, "train.py")] + TINY_MODEL + [
        "--num-classes", "2", "--data-path", data, "--batch-size", "2", "--log-every", "1", "--ckpt-every",
        "1000", "--epochs", "2"]
    out = stop_and_continue(
        lambda d: cmd + ["--results-dir", str(d)], lambda d: training_env(), signum=signal.SIGTERM,
        run_dir=tmp_path / "run", full_dir=tmp_path / "full", log_file="000-DiT-S-4/log.txt",
        logged_step=r"\(step=0000002\)", final_files=["000-DiT-S-4/checkpoints/0000024.pt"],
        set_files=lambda s: ["000-DiT-S-4/checkpoints/%07d.pt" % s], cwd=tmp_path, key="model")
    print("SIGTERM after step %d; worst relative difference: %g" % (out["step"], out["worst_relative_difference"]))
    assert 3 <= out["step"] < 24 and out["worst_relative_difference"] == 0.0
    assert os.listdir(tmp_path / "run") == ["000-DiT-S-4"]  # the rerun continued the run in its own folder
    assert "the newest checkpoint of this command's run" in (tmp_path / "run" / "000-DiT-S-4" / "log.txt").read_text()


def test_train_with_ema_std_saves_power_emas_beside_each_checkpoint_and_resumes_them_exactly(tmp_path):
    """--ema-std 0.05,0.1 --ckpt-every 1: phema_<std>_<step>.pt beside every checkpoint equal EDM2's recursion on the
    model weights of steps 1..k (betas from EDM2's code, tests/fixtures/phema); a resumed run continues them bit for
    bit; reconstruct_ema.py on the run folder writes a state dict with the model's keys and shapes (--ckpt)."""
    edm2 = np.load(os.path.join(ROOT, "tests", "fixtures", "phema", "edm2_phema.npz"))
    data = _image_folder(str(tmp_path / "data"))
    common = TINY_MODEL + ["--num-classes", "2", "--data-path", data, "--batch-size", "2", "--results-dir", "res",
                           "--log-every", "1", "--ckpt-every", "1", "--epochs", "2", "--ema-std", "0.05,0.1"]
    _run("train.py", common, tmp_path)
    ckpts = tmp_path / "res" / "000-DiT-S-4" / "checkpoints"
    assert sorted(os.listdir(ckpts)) == ["%07d.pt" % k for k in range(1, 5)] + [
        "phema_%s_%06d.pt" % (s, k) for s in ("0.050", "0.100") for k in range(1, 5)]
    for i, std in enumerate((0.05, 0.1)):
        ema = None
        for k in range(1, 5):
            raw = load_file(str(ckpts / ("%07d.pt" % k)))["model"]
            beta = edm2["betas"][i, k - 1]
            ema = {n: v.astype(np.float64) for n, v in raw.items()} if ema is None else {
                n: ema[n] + (1 - beta) * (raw[n].astype(np.float64) - ema[n]) for n in ema}
            snapshot = load_file(str(ckpts / ("phema_%.3f_%06d.pt" % (std, k))))
            assert set(snapshot) == set(raw)
            for n in raw:
                np.testing.assert_allclose(snapshot[n], ema[n], rtol=1e-5, atol=1e-6, err_msg="%g %d %s" % (std, k, n))

    _run("train.py", common + ["--resume", str(ckpts / "0000002.pt")], tmp_path)
    resumed = tmp_path / "res" / "001-DiT-S-4" / "checkpoints"
    for name in ("phema_0.050_000004.pt", "phema_0.100_000004.pt"):
        a, b = load_file(str(ckpts / name)), load_file(str(resumed / name))
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=name + ":" + k)

    out = tmp_path / "dit_ema.pt"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "reconstruct_ema.py"), "--log_dir",
                           str(tmp_path / "res" / "000-DiT-S-4"), "--std", "0.08", "--out", str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "from 8 snapshots" in proc.stdout
    loaded = download.find_model(str(out))  # what sample.py's --ckpt loads (strictly: same keys and shapes)
    assert {k: v.shape for k, v in loaded.items()} == {k: v.shape for k, v in raw.items()}


def test_train_finetune_from_a_checkpoint_with_other_classes_reinitialises_the_label_table(tmp_path):
    data = _image_folder(str(tmp_path / "data"))  # 2 classes; the fixture checkpoint has another class count
    args = TINY_MODEL + ["--num-classes", "2", "--data-path", data, "--batch-size", "2", "--results-dir", "res",
                         "--log-every", "1", "--ckpt-every", "100", "--max-steps", "1", "--finetune-from", TINY_CKPT]
    _run("train.py", args, tmp_path)
    run = tmp_path / "res" / "000-DiT-S-4"
    log = (run / "log.txt").read_text()
    assert "y_embedder.embedding_table.weight" in log, log[-3000:]
    source = load_file(TINY_CKPT)
    source = source.get("ema", source.get("model", source))
    tuned = load_file(str(run / "checkpoints" / "0000001.pt"))
    assert tuned["model"]["y_embedder.embedding_table.weight"].shape[0] == 3  # 2 classes + the null label
    assert source["y_embedder.embedding_table.weight"].shape[0] != 3
    proc = _run("train.py", args + ["--resume", str(run / "checkpoints" / "0000001.pt")], tmp_path, expect_ok=False)
    assert proc.returncode == 2 and "--finetune-from" in proc.stderr
