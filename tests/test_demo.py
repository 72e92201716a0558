"""Tests of the demo: the shipped digits, their export for --data_dir, the demo checkpoints and `scripts/demo.py`."""

import os
import re
import subprocess
import sys

import numpy as np
import pytest

import guided_diffusion  # noqa: F401  (prepares Jittor before it is imported)
from guided_diffusion import script_util
from guided_diffusion.checkpoint import load_file, save_file
from guided_diffusion.errors import DataError
from guided_diffusion.image_datasets import load_data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_DIR = os.path.join(ROOT, "scripts", "demo")
sys.path.insert(0, DEMO_DIR)
import digits  # noqa: E402  (scripts/demo/digits.py)
DIGITS_NPZ = os.path.join(DEMO_DIR, "mnist_5k.npz")
PYTHON = sys.executable
# One OpenMP thread per process: on a shared CPU, spinning OpenMP threads make Jittor many times slower.
ENV = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))


def test_shipped_digits_hold_500_images_per_digit():
    images, labels = digits.load_digits_npz(DIGITS_NPZ)
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8
    assert np.array_equal(np.bincount(labels, minlength=10), np.full(10, 500))
    assert images.max() > 200 and images.min() == 0


def test_pad_to_rgb_centres_the_digit_on_black_and_copies_gray_to_rgb():
    img = np.arange(28 * 28, dtype=np.uint8).reshape(1, 28, 28)
    out = digits.pad_to_rgb(img)
    assert out.shape == (1, 32, 32, 3) and out.dtype == np.uint8
    assert np.array_equal(out[0, 2:30, 2:30, 0], img[0])
    assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 0], out[..., 2])
    assert out[0, :2].max() == 0 and out[0, 30:].max() == 0 and out[0, :, :2].max() == 0


def test_export_names_files_by_class_and_the_training_loader_reads_the_classes(tmp_path):
    images, labels = digits.load_digits_npz(DIGITS_NPZ)
    pick = np.concatenate([np.flatnonzero(labels == d)[:2] for d in range(10)])
    small = tmp_path / "small.npz"
    np.savez(small, images=images[pick], labels=labels[pick].astype(np.uint8))
    out = tmp_path / "digits"
    assert digits.export_digits(str(small), str(out)) == 20
    names = sorted(os.listdir(out))
    assert len(names) == 20 and all(re.fullmatch(r"\d_\d{5}\.png", n) for n in names)
    from PIL import Image

    for i, label in enumerate(labels[pick]):
        with Image.open(out / digits.digit_file_name(label, i)) as im:
            arr = np.asarray(im.convert("RGB"))
        assert arr.shape == (32, 32, 3)
        assert np.array_equal(arr[2:30, 2:30, 1], images[pick][i])
    # The training scripts' --data_dir path: class = file-name prefix, 0..9 in order.
    data = load_data(data_dir=str(out), batch_size=20, image_size=32, class_cond=True, deterministic=True,
                     random_flip=False)
    batch, cond = next(data)
    data.close()
    mean_by_label = {int(y): float(np.asarray(b).mean()) for b, y in zip(batch, cond["y"])}
    assert sorted(mean_by_label) == list(range(10))
    # A second export keeps the files and reports the same count.
    assert digits.export_digits(str(small), str(out)) == 20


def test_export_of_a_missing_digits_file_says_how_to_restore_it(tmp_path):
    with pytest.raises(DataError, match="restore it with git"):
        digits.export_digits(str(tmp_path / "none.npz"), str(tmp_path / "out"))


def test_demo_classifier_flags_build_a_32x32_classifier_with_the_32px_channel_mult():
    flags = script_util.classifier_defaults()
    flags.update(digits.DEMO_CLASSIFIER_FLAGS)
    model = script_util.create_classifier(**flags)
    assert list(model.channel_mult) == list(digits.CLASSIFIER_CHANNEL_MULT_32)


def test_demo_checkpoint_is_stored_as_float16_and_loads_back_as_float32(tmp_path):
    src, dest = str(tmp_path / "ema.pt"), str(tmp_path / "demo.pt")
    weights = {"w": np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4), "n": np.array(3, dtype=np.int64)}
    save_file(weights, src)
    assert digits.save_demo_checkpoint(src, dest) == 2
    back = load_file(dest)
    assert back["w"].dtype == np.float16 and back["n"].dtype == np.int64
    np.testing.assert_allclose(back["w"].astype(np.float32), weights["w"], atol=1e-3)


def test_committed_demo_checkpoints_fit_the_demo_flags():
    model, diffusion, classifier = digits.load_demo_models(
        os.path.join(DEMO_DIR, "free_digits.pt"), os.path.join(DEMO_DIR, "classifier_digits.pt"), "ddim25")
    assert model.label_emb.weight.shape[0] == digits.NUM_DIGITS + 1
    assert diffusion.num_timesteps == 25


def test_null_label_model_always_passes_the_null_label():
    import jittor as jt

    seen = {}

    def fake_model(x, t, y=None):
        seen["y"] = y.numpy()
        return x

    wrapped = digits.NullLabelModel(fake_model, 10)
    wrapped(jt.zeros((3, 3, 4, 4)), jt.zeros((3,), dtype="int32"), y=jt.array(np.array([1, 2, 3], np.int32)))
    assert seen["y"].tolist() == [10, 10, 10]


def test_demo_writes_npz_files_grids_and_the_figures_of_every_run(tmp_path):
    out = tmp_path / "demo"
    cmd = [PYTHON, os.path.join(ROOT, "scripts", "demo.py"), "--out_dir", str(out), "--num_per_class", "1",
           "--timestep_respacing", "ddim2", "--fast_respacing", "logsnr2", "--unipc_respacing", "logsnr2"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("unguided", "conditional", "cfg", "classifier"):
        for suffix in ("", "-dpm++2m-logsnr2", "-unipc-bh2-1-logsnr2"):
            npz = out / (name + suffix) / "samples_10x32x32x3.npz"
            with np.load(npz) as data:
                assert data["arr_0"].shape == (10, 32, 32, 3) and data["arr_0"].dtype == np.uint8
                assert data["arr_1"].tolist() == list(range(10))
            grid = out / ("grid_%s%s.png" % (name, suffix))
            assert str(npz) in proc.stdout and str(grid) in proc.stdout
            from PIL import Image

            with Image.open(grid) as im:
                assert im.size == (2 + 1 * 34, 2 + 10 * 34)  # one column, one row per digit
    report = proc.stdout[proc.stdout.index("\nddim ddim2:"):proc.stdout.index("\nside by side")]
    sections = re.split(r"^(ddim ddim2|dpm\+\+2m logsnr2|unipc-bh2-1 logsnr2):$", report, flags=re.M)
    assert sections[1::2] == ["ddim ddim2", "dpm++2m logsnr2", "unipc-bh2-1 logsnr2"]
    suffixes = {"ddim ddim2": "", "dpm++2m logsnr2": "-dpm++2m-logsnr2", "unipc-bh2-1 logsnr2": "-unipc-bh2-1-logsnr2"}
    side = proc.stdout[proc.stdout.index("\nside by side"):]
    assert re.search(r"^  classifier\s+[01]\.\d\d / [\d.]+ / [\d.]+\s+[01]\.\d\d / [\d.]+ / [\d.]+\s+[01]\.\d\d / ",
                     side, flags=re.M)
    for sampler, body in zip(sections[1::2], sections[2::2]):
        suffix = suffixes[sampler]
        rows = re.findall(r"^  accuracy (.+?):\s+([01]\.\d\d) \((\d+)/10\)  spread\s+([\d.]+)  border\s+([\d.]+)$",
                          body, flags=re.M)
        assert [r[0].split(" ")[0] for r in rows] == ["unguided", "conditional,", "classifier-free", "classifier"]
        for (_, frac, count, spread, border), name in zip(rows, ("unguided", "conditional", "cfg", "classifier")):
            assert abs(float(frac) - int(count) / 10) < 1e-9
            with np.load(out / (name + suffix) / "samples_10x32x32x3.npz") as data:  # the printed figures are these
                assert float(spread) == pytest.approx(digits.colour_spread(data["arr_0"]), abs=0.051)
                assert float(border) == pytest.approx(digits.border_mean(data["arr_0"]), abs=0.051)


def test_colour_spread_and_border_mean_of_gray_digits_on_black_are_zero():
    gray = digits.pad_to_rgb(np.full((2, 28, 28), 200, np.uint8))  # 28x28 digits padded to 32x32: frame of 2 black
    assert digits.colour_spread(gray) == 0.0
    assert digits.border_mean(gray, width=2) == 0.0 and digits.border_mean(gray, width=3) > 0
    coloured = gray.copy()
    coloured[..., 0] = 255
    assert digits.colour_spread(coloured) == pytest.approx((55 * 28 * 28 + 255 * (32 * 32 - 28 * 28)) / (2 * 32 * 32))
    frame = np.zeros((1, 8, 8, 3), np.uint8)
    frame[:, 0] = 90  # the top row of a 1-px frame of 28 pixels
    assert digits.border_mean(frame, width=1) == pytest.approx(90 * 8 / 28)


def test_demo_with_a_missing_checkpoint_exits_with_the_fix(tmp_path):
    cmd = [PYTHON, os.path.join(ROOT, "scripts", "demo.py"), "--out_dir", str(tmp_path / "demo"),
           "--model_path", str(tmp_path / "missing.pt")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode == 2
    assert "error:" in proc.stderr and "missing.pt" in proc.stderr and "not found" in proc.stderr
