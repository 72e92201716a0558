"""Tests for guided_diffusion.cifar10: reading the python batches, extraction, download wiring and errors."""

import os
import pickle
import tarfile

import numpy as np
import pytest

from guided_diffusion import cifar10
from guided_diffusion.errors import DataError, DownloadError


def write_cifar_batches(folder, n_per_batch=4, seed=0):
    """Tiny CIFAR-format batches (dicts with b"data" uint8 (N, 3072) and b"labels") in folder."""
    rng = np.random.RandomState(seed)
    os.makedirs(folder, exist_ok=True)
    all_images, all_labels = [], []
    for name in cifar10.TRAIN_BATCHES:
        data = rng.randint(0, 256, (n_per_batch, 3072), dtype=np.uint8)
        labels = [int(x) for x in rng.randint(0, 10, n_per_batch)]
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump({b"data": data, b"labels": labels, b"batch_label": b"x"}, f)
        all_images.append(data)
        all_labels.extend(labels)
    return np.concatenate(all_images), np.array(all_labels)


def test_batches_are_read_as_nhwc_uint8_with_labels(tmp_path):
    data, labels = write_cifar_batches(tmp_path / "cifar-10-batches-py")
    assert cifar10.find_cifar10_batches(str(tmp_path)) == str(tmp_path / "cifar-10-batches-py")
    images, got_labels = cifar10.load_cifar10_arrays(str(tmp_path / "cifar-10-batches-py"))
    assert images.shape == (20, 32, 32, 3) and images.dtype == np.uint8
    # channel-major rows: the first 1024 bytes are the red plane
    np.testing.assert_array_equal(images[0, :, :, 0].reshape(-1), data[0, :1024])
    np.testing.assert_array_equal(images[3, :, :, 2].reshape(-1), data[3, 2048:])
    np.testing.assert_array_equal(got_labels, labels)


def test_training_batches_are_scaled_and_labelled(tmp_path):
    _, labels = write_cifar_batches(tmp_path)
    data = cifar10.load_cifar10_data(data_dir=str(tmp_path), batch_size=5, random_flip=False, download=False)
    images, cond = next(data)
    assert images.shape == (5, 3, 32, 32) and images.dtype == np.float32
    assert -1.0 <= images.min() and images.max() <= 1.0
    assert set(cond["y"].tolist()) <= set(labels.tolist())
    data.close()


def test_missing_or_corrupt_batches_raise_data_error(tmp_path):
    write_cifar_batches(tmp_path)
    os.remove(tmp_path / "data_batch_3")
    with pytest.raises(DataError, match="data_batch_3"):
        cifar10.load_cifar10_arrays(str(tmp_path))
    (tmp_path / "data_batch_3").write_bytes(b"garbage")
    with pytest.raises(DataError, match="data_batch_3"):
        cifar10.load_cifar10_arrays(str(tmp_path))


def _make_archive(path, src_dir):
    with tarfile.open(path, "w:gz") as tar:
        for name in sorted(os.listdir(src_dir)):
            tar.add(os.path.join(src_dir, name), arcname="cifar-10-batches-py/" + name)


def test_absent_dataset_is_downloaded_and_extracted(tmp_path, monkeypatch):
    write_cifar_batches(tmp_path / "src")
    archive = tmp_path / "fake.tar.gz"
    _make_archive(archive, tmp_path / "src")
    calls = []

    def fake_download(url, dest, *, what, place_hint="", **kw):
        calls.append((url, dest, place_hint))
        with open(archive, "rb") as s, open(dest, "wb") as d:
            d.write(s.read())
        return dest

    monkeypatch.setattr("guided_diffusion.download.download_file", fake_download)
    target = tmp_path / "data"
    data = cifar10.load_cifar10_or_folder(data_dir=str(target), batch_size=4, image_size=32)
    assert calls and calls[0][0] == cifar10.CIFAR10_URL
    assert calls[0][1] == str(target / "cifar-10-python.tar.gz")
    assert os.path.isfile(target / "cifar-10-batches-py" / "data_batch_5")
    assert next(data)[0].shape == (4, 3, 32, 32)
    data.close()


def test_offline_download_error_says_where_to_put_the_file(tmp_path, monkeypatch):
    def offline(url, dest, *, what, place_hint="", **kw):
        raise DownloadError("cannot download %s: %s" % (url, place_hint))

    monkeypatch.setattr("guided_diffusion.download.download_file", offline)
    with pytest.raises(DownloadError) as info:
        cifar10.load_cifar10_data(data_dir=str(tmp_path / "d"), batch_size=2)
    assert "cifar-10-python.tar.gz" in str(info.value) and str(tmp_path / "d") in str(info.value)


def test_a_broken_archive_raises_data_error(tmp_path):
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"not a tarball")
    with pytest.raises(DataError, match="cifar-10-python.tar.gz"):
        cifar10.extract_cifar10_archive(str(tmp_path / "cifar-10-python.tar.gz"), str(tmp_path))
    assert not os.path.exists(tmp_path / "cifar-10-batches-py")


def test_an_image_folder_is_used_instead_of_cifar(tmp_path):
    from PIL import Image

    for i in range(4):
        Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)).save(tmp_path / ("c%d_%d.png" % (i % 2, i)))
    data = cifar10.load_cifar10_or_folder(data_dir=str(tmp_path), batch_size=4, image_size=32)
    images, cond = next(data)
    assert sorted(cond["y"].tolist()) == [0, 0, 1, 1]
    data.close()
