"""Tests for guided_diffusion.image_datasets: file listing, labels, crops, sharding, determinism and errors."""

import os
import random

import numpy as np
import pytest
from PIL import Image

from guided_diffusion.errors import DataError
from guided_diffusion.image_datasets import (
    ImageDataset,
    _list_image_files_recursively,
    area_downsample,
    center_crop_arr,
    load_data,
    random_crop_arr,
    with_label_dropout,
)


def _write_images(folder, names, size=(40, 36), seed=0):
    rng = np.random.RandomState(seed)
    os.makedirs(folder, exist_ok=True)
    for name in names:
        arr = rng.randint(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(arr).save(os.path.join(folder, name))


def test_listing_is_recursive_sorted_and_filters_extensions(tmp_path):
    _write_images(tmp_path, ["b_1.png", "a_2.JPG"])
    _write_images(tmp_path / "sub", ["c_3.jpeg"])
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "noext").write_text("x")
    files = [os.path.relpath(f, tmp_path) for f in _list_image_files_recursively(str(tmp_path))]
    assert files == ["a_2.JPG", "b_1.png", os.path.join("sub", "c_3.jpeg")]


def test_class_labels_come_from_the_prefix_before_the_first_underscore(tmp_path):
    _write_images(tmp_path, ["dog_1.png", "cat_1.png", "dog_2_x.png", "cat_2.png"])
    data = load_data(data_dir=str(tmp_path), batch_size=4, image_size=16, class_cond=True, deterministic=True)
    images, cond = next(data)
    # sorted files: cat_1, cat_2, dog_1, dog_2_x ; classes sorted: cat=0, dog=1
    assert cond["y"].dtype == np.int64
    assert cond["y"].tolist() == [0, 0, 1, 1]
    assert images.shape == (4, 3, 16, 16) and images.dtype == np.float32
    assert images.min() >= -1.0 and images.max() <= 1.0


def test_center_crop_halves_with_box_then_bicubic_resizes_and_centres(tmp_path):
    arr = np.random.RandomState(1).randint(0, 256, (70, 100, 3), dtype=np.uint8)
    img = Image.fromarray(arr)
    out = center_crop_arr(img, 16)
    # BOX halvings while the short side >= 32: (50, 35), (25, 17); BICUBIC to (round(25*16/17), 16) = (24, 16);
    # then the centre 16 columns.
    expect = np.array(img.resize((50, 35), Image.BOX).resize((25, 17), Image.BOX).resize((24, 16), Image.BICUBIC))
    expect = expect[:, 4:20]
    np.testing.assert_array_equal(out, expect)
    same = np.random.RandomState(2).randint(0, 256, (16, 16, 3), dtype=np.uint8)
    np.testing.assert_array_equal(center_crop_arr(Image.fromarray(same), 16), same)


def test_random_crop_is_reproducible_from_its_rng():
    img = Image.fromarray(np.random.RandomState(3).randint(0, 256, (64, 80, 3), dtype=np.uint8))
    a = random_crop_arr(img, 32, rng=random.Random(5))
    b = random_crop_arr(img, 32, rng=random.Random(5))
    assert a.shape == (32, 32, 3)
    np.testing.assert_array_equal(a, b)


def test_random_flip_mirrors_horizontally(tmp_path):
    _write_images(tmp_path, ["a_1.png"], size=(16, 16))
    ds = ImageDataset(16, _list_image_files_recursively(str(tmp_path)), random_flip=True)

    class Always:
        def random(self):
            return 0.0

    class Never:
        def random(self):
            return 0.99

    flipped, _ = ds.get(0, Always())
    plain, _ = ds.get(0, Never())
    np.testing.assert_array_equal(flipped, plain[:, :, ::-1])


def test_shards_take_every_nth_file_from_the_rank():
    paths = ["p%d" % i for i in range(7)]
    ds = ImageDataset(8, paths, classes=list(range(7)), shard=1, num_shards=3)
    assert ds.local_images == ["p1", "p4"]
    assert ds.local_classes == [1, 4]


def test_batches_depend_only_on_seed_and_index_and_seek_jumps(tmp_path):
    _write_images(tmp_path, ["c%d_%d.png" % (i % 3, i) for i in range(10)])
    a = load_data(data_dir=str(tmp_path), batch_size=3, image_size=16, class_cond=True, random_crop=True)
    first = [next(a) for _ in range(5)]  # crosses an epoch boundary (3 batches per epoch)
    b = load_data(data_dir=str(tmp_path), batch_size=3, image_size=16, class_cond=True, random_crop=True)
    b.seek(3)
    for k in (3, 4):
        images, cond = next(b)
        np.testing.assert_array_equal(images, first[k][0])
        np.testing.assert_array_equal(cond["y"], first[k][1]["y"])
    assert not np.array_equal(first[0][0], first[3][0])  # a new epoch is a new order
    with pytest.raises(RuntimeError):
        b.seek(0)
    a.close()
    b.close()


def test_missing_empty_and_unreadable_data_raise_data_error_naming_it(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_data(data_dir=str(tmp_path / "nope"), batch_size=1, image_size=8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        load_data(data_dir=str(tmp_path / "empty"), batch_size=1, image_size=8)
    with pytest.raises(DataError, match="--data_dir"):
        load_data(data_dir="", batch_size=1, image_size=8)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x_1.png").write_bytes(b"not a png")
    data = load_data(data_dir=str(bad), batch_size=1, image_size=8)
    with pytest.raises(DataError, match="x_1.png"):
        next(data)
    _write_images(tmp_path / "few", ["a_1.png"])
    with pytest.raises(DataError, match="batch_size"):
        load_data(data_dir=str(tmp_path / "few"), batch_size=2, image_size=8)


def test_area_downsample_averages_blocks():
    x = np.arange(2 * 3 * 4 * 4, dtype=np.float32).reshape(2, 3, 4, 4)
    y = area_downsample(x, 2)
    np.testing.assert_allclose(y[0, 0], [[2.5, 4.5], [10.5, 12.5]])
    # a non-integer ratio follows adaptive average pooling
    z = area_downsample(np.arange(9, dtype=np.float32).reshape(1, 1, 3, 3), 2)
    np.testing.assert_allclose(z[0, 0], [[2.0, 3.0], [5.0, 6.0]])


def test_label_dropout_uses_the_null_label_at_the_requested_rate(tmp_path):
    _write_images(tmp_path, ["c%d_%d.png" % (i % 2, i) for i in range(8)], size=(8, 8))
    base = load_data(data_dir=str(tmp_path), batch_size=8, image_size=8, class_cond=True)
    data = with_label_dropout(base, 0.5, null_label=2, seed=0)
    ys = np.concatenate([next(data)[1]["y"] for _ in range(10)])
    assert set(np.unique(ys)) <= {0, 1, 2}
    assert 0.3 < np.mean(ys == 2) < 0.7
    again = with_label_dropout(load_data(data_dir=str(tmp_path), batch_size=8, image_size=8, class_cond=True),
                               0.5, null_label=2, seed=0)
    again.seek(3)
    np.testing.assert_array_equal(next(again)[1]["y"], ys[24:32])
    too_few = with_label_dropout(load_data(data_dir=str(tmp_path), batch_size=8, image_size=8, class_cond=True),
                                 0.1, null_label=1)
    with pytest.raises(DataError, match="num_classes"):
        next(too_few)
