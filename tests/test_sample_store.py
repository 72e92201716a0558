"""Unit tests of guided_diffusion.sample_store's streamed .npz writer (the partial-batch store with resume is
exercised through the batch loop in test_sampling.py)."""

import os
import zipfile

import numpy as np
import pytest

from guided_diffusion import sample_store
from guided_diffusion.npz_tools import read_npy_header


def _images(n=10):
    rng = np.random.RandomState(0)
    return rng.randint(0, 256, size=(n, 4, 5, 3)).astype(np.uint8), rng.randint(0, 10, size=(n,))


def test_write_npz_streaming_is_read_like_np_savez(tmp_path):
    images, labels = _images()
    path = str(tmp_path / "s.npz")
    sample_store.write_npz_streaming(path, images.shape, [images[:4], images[4:8], images[8:]], labels)
    with np.load(path) as data:
        assert sorted(data.files) == ["arr_0", "arr_1"]
        np.testing.assert_array_equal(data["arr_0"], images)
        assert data["arr_1"].dtype == np.int64
        np.testing.assert_array_equal(data["arr_1"], labels)
    # the evaluator reads the .npy member's header directly from the zip
    with zipfile.ZipFile(path) as zf, zf.open("arr_0.npy") as f:
        shape, fortran, dtype = read_npy_header(f)
    assert shape == images.shape and not fortran and dtype == np.uint8


def test_write_npz_streaming_leaves_no_file_when_short(tmp_path):
    images, _ = _images()
    path = str(tmp_path / "s.npz")
    with pytest.raises(ValueError):
        sample_store.write_npz_streaming(path, images.shape, [images[:4]])
    assert os.listdir(tmp_path) == []


def test_samples_npz_name_is_the_references():
    assert sample_store.samples_npz_name(100, (256, 256, 3)) == "samples_100x256x256x3.npz"
