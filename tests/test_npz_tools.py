"""Tests of scripts/npz_tools.py and the .npz helpers behind it (info, export, grid, pack)."""

import os

import numpy as np
import pytest
from PIL import Image

from guided_diffusion import npz_tools
from guided_diffusion.errors import UserError
from sampling_helpers import assert_user_error, run_script

SCRIPT = "scripts/npz_tools.py"


@pytest.fixture
def samples(tmp_path):
    rng = np.random.RandomState(0)
    images = rng.randint(0, 256, size=(5, 8, 8, 3)).astype(np.uint8)
    labels = np.array([4, 1, 4, 2, 9], dtype=np.int64)
    path = str(tmp_path / "samples_5x8x8x3.npz")
    np.savez(path, images, labels)
    return path, images, labels


def test_iter_npz_images_streams_arr_0_in_chunks(samples):
    path, images, _ = samples
    chunks = list(npz_tools.iter_npz_images(path, chunk=2))
    assert [len(c) for c in chunks] == [2, 2, 1]
    np.testing.assert_array_equal(np.concatenate(chunks), images)
    assert sum(len(c) for c in npz_tools.iter_npz_images(path, chunk=2, limit=3)) == 3


def test_info_describes_arrays_and_labels(samples, tmp_path):
    path, _, _ = samples
    proc = run_script(SCRIPT, ["info", path], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "arr_0: uint8 5x8x8x3" in proc.stdout and "arr_1: int64 5" in proc.stdout
    assert "4 classes used, ids 1..9" in proc.stdout


def test_export_writes_one_png_per_image_and_a_grid(samples, tmp_path):
    path, images, labels = samples
    out = tmp_path / "pngs"
    assert npz_tools.export_npz_images(path, str(out), limit=4) == 4
    assert sorted(os.listdir(out)) == ["000000_class4.png", "000001_class1.png", "000002_class4.png",
                                       "000003_class2.png", "grid.png"]
    np.testing.assert_array_equal(np.asarray(Image.open(out / "000003_class2.png")), images[3])


def test_grid_command_writes_a_png(samples, tmp_path):
    path, _, _ = samples
    proc = run_script(SCRIPT, ["grid", path, tmp_path / "g.png", "--count", 4, "--nrow", 2], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert np.asarray(Image.open(tmp_path / "g.png")).shape == (2 + 2 * 10, 2 + 2 * 10, 3)


def test_pack_builds_an_npz_with_labels_from_file_names(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.RandomState(1)
    expected = {}
    for name in ["dog_1.png", "cat_1.png", "cat_2.png"]:
        arr = rng.randint(0, 256, size=(6, 6, 3)).astype(np.uint8)
        Image.fromarray(arr).save(folder / name)
        expected[name] = arr
    out = str(tmp_path / "packed.npz")
    assert npz_tools.pack_images_to_npz(str(folder), out, with_labels=True) == (3, 6, 6, 3)
    with np.load(out) as data:
        np.testing.assert_array_equal(data["arr_0"][0], expected["cat_1.png"])  # sorted file order
        np.testing.assert_array_equal(data["arr_0"][2], expected["dog_1.png"])
        assert data["arr_1"].tolist() == [0, 0, 1]


def test_pack_needs_one_size_or_image_size(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(np.zeros((6, 6, 3), np.uint8)).save(folder / "a.png")
    Image.fromarray(np.zeros((8, 10, 3), np.uint8)).save(folder / "b.png")
    with pytest.raises(UserError, match="--image_size"):
        npz_tools.pack_images_to_npz(str(folder), str(tmp_path / "x.npz"))
    assert not (tmp_path / "x.npz").exists()
    assert npz_tools.pack_images_to_npz(str(folder), str(tmp_path / "x.npz"), image_size=4) == (2, 4, 4, 3)


def test_npz_tools_reports_missing_file(tmp_path):
    assert_user_error(run_script(SCRIPT, ["info", tmp_path / "none.npz"], tmp_path), "none.npz", "not found")
