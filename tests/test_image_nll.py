"""End-to-end test of scripts/image_nll.py (bits/dim with calc_bpd_loop) on the fixture 64x64 UNet."""

import numpy as np
from PIL import Image

import guided_diffusion  # noqa: F401
from sampling_helpers import UNET, assert_ok, assert_user_error, run_script, unet_flags

SCRIPT = "scripts/image_nll.py"


def _data_dir(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    rng = np.random.RandomState(0)
    for name in ["cat_0.png", "dog_0.png"]:
        Image.fromarray(rng.randint(0, 256, size=(64, 64, 3)).astype(np.uint8)).save(folder / name)
    return folder


def test_image_nll_writes_per_timestep_terms_and_logs_bpd(tmp_path):
    logdir = tmp_path / "log"
    args = unet_flags() + ["--model_path", UNET, "--data_dir", _data_dir(tmp_path), "--num_samples", 2,
                           "--batch_size", 2, "--timestep_respacing", "4"]
    proc = run_script(SCRIPT, args, logdir)
    assert_ok(proc)
    for name in ("vb", "mse", "xstart_mse"):
        with np.load(logdir / ("%s_terms.npz" % name)) as data:
            terms = data["arr_0"]
        assert terms.shape == (4,) and np.isfinite(terms).all(), (name, terms)
    assert "done 2 samples: bpd=" in proc.stdout
    bpd = float(proc.stdout.split("bpd=")[1].split()[0])
    assert np.isfinite(bpd) and bpd > 0  # (a random-weight model on noise images: large but finite)


def test_image_nll_reports_missing_data_dir(tmp_path):
    args = unet_flags() + ["--model_path", UNET, "--data_dir", tmp_path / "nothing"]
    assert_user_error(run_script(SCRIPT, args, tmp_path), "--data_dir")
