"""Tests of scripts/download_models.py: names -> URLs and destinations, files already present, bad names."""

import os

import pytest

from guided_diffusion import download
from guided_diffusion.errors import UserError
from sampling_helpers import assert_user_error, run_script

SCRIPT = "scripts/download_models.py"


def test_names_map_to_the_released_urls_and_the_models_dir(tmp_path, monkeypatch):
    calls = []

    def fake_download(url, dest, *, what, place_hint):
        calls.append((url, dest, place_hint))
        return dest

    monkeypatch.setattr(download, "download_file", fake_download)
    paths = download.download_released_checkpoints(["256x256_diffusion", "256x256_classifier.pt",
                                                    "256x256_diffusion"], str(tmp_path))
    base = "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/"
    assert [c[0] for c in calls] == [base + "256x256_diffusion.pt", base + "256x256_classifier.pt"]
    assert paths == [str(tmp_path / "256x256_diffusion.pt"), str(tmp_path / "256x256_classifier.pt")]
    assert base + "256x256_diffusion.pt" in calls[0][2]  # the hint says where to get the file by hand


def test_all_downloads_every_released_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(download, "download_file", lambda url, dest, **kw: dest)
    paths = download.download_released_checkpoints(["all"], str(tmp_path))
    assert len(paths) == 15 and str(tmp_path / "64_256_upsampler.pt") in paths


def test_unknown_name_lists_the_released_ones(tmp_path):
    with pytest.raises(UserError, match="256x256_diffusion_uncond"):
        download.download_released_checkpoints(["256x256_difusion"], str(tmp_path))


def test_script_keeps_files_already_present(tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    (models / "lsun_cat.pt").write_bytes(b"already here")
    proc = run_script(SCRIPT, ["lsun_cat", "--models_dir", models], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("lsun_cat.pt")
    assert (models / "lsun_cat.pt").read_bytes() == b"already here"


def test_script_rejects_unknown_names(tmp_path):
    assert_user_error(run_script(SCRIPT, ["nope", "--models_dir", tmp_path], tmp_path), "unknown checkpoint 'nope'")
    assert os.listdir(tmp_path) == []
