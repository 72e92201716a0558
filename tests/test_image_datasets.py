"""Tests for guided_diffusion.image_datasets: file listing, labels, crops, rank split, determinism and errors."""

import json
import os
import random
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from guided_diffusion.errors import DataError
from guided_diffusion.image_datasets import (
    BatchIterator,
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


class _IndexDataset:
    """n samples whose image is (index, flip) and whose label is index % 8: what a batch holds, at a glance."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def get(self, idx, rng):
        return np.array([idx, rng.random() < 0.5], dtype=np.float32), {"y": np.array(idx % 8, dtype=np.int64)}


def _epoch(it, batches):
    return np.concatenate([next(it)[0] for _ in range(batches)])


def test_one_epoch_over_all_ranks_covers_the_dataset_once_padded_to_equal_counts():
    n, world = 10, 4
    its = [BatchIterator(_IndexDataset(n), 1, seed=3, rank=r, world_size=world) for r in range(world)]
    assert [it.batches_per_epoch for it in its] == [3] * world  # ceil(10 / 4): DistributedSampler's padding
    seen = np.concatenate([_epoch(it, 3)[:, 0] for it in its]).astype(int)
    assert sorted(set(seen.tolist())) == list(range(n)) and len(seen) == 12  # every image, 2 padding repeats
    order = its[0].epoch_order(0)
    for r, it in enumerate(its):  # rank r reads positions r, r + N, ... of the one global permutation
        it.close()
        np.testing.assert_array_equal(
            np.array([it.make_batch(k)[0][0, 0] for k in range(3)]), order[r::world][:3])


def test_ranks_draw_independent_orders_and_flips_not_the_same_ones():
    a, b = (BatchIterator(_IndexDataset(64), 4, seed=0, rank=r, world_size=2) for r in (0, 1))
    x0, x1 = _epoch(a, 32), _epoch(b, 32)  # four epochs
    labels0, labels1 = x0[:, 0].astype(int) % 8, x1[:, 0].astype(int) % 8
    assert np.mean(labels0 == labels1) < 0.3  # chance is 1/8; lockstep would be 1
    assert 0.3 < np.mean(x0[:, 1] == x1[:, 1]) < 0.7  # chance is 1/2
    a.close()
    b.close()


def test_the_global_batch_and_its_flips_are_the_same_for_any_number_of_ranks():
    one = BatchIterator(_IndexDataset(16), 4, seed=5, rank=0, world_size=1)
    two = [BatchIterator(_IndexDataset(16), 2, seed=5, rank=r, world_size=2) for r in (0, 1)]
    for k in range(6):  # crosses epochs
        whole = sorted(map(tuple, one.make_batch(k)[0].tolist()))
        halves = sorted(map(tuple, np.concatenate([it.make_batch(k)[0] for it in two]).tolist()))
        assert whole == halves


def test_label_dropout_is_independent_across_ranks_and_the_same_for_any_number_of_ranks():
    def dropped(rank, world, batch):
        it = with_label_dropout(BatchIterator(_IndexDataset(64), batch, seed=1, rank=rank, world_size=world),
                                0.5, null_label=8, seed=2)
        out = [next(it) for _ in range(64 // (batch * world))]  # one epoch
        it.close()
        return {int(i): int(y) for x, c in out for i, y in zip(x[:, 0], c["y"])}

    one = dropped(0, 1, 4)
    r0, r1 = dropped(0, 2, 2), dropped(1, 2, 2)
    assert set(r0) | set(r1) == set(one) and not set(r0) & set(r1)
    assert {**r0, **r1} == one
    mask0 = [r0[i] == 8 for i in sorted(r0)]
    assert 0.2 < np.mean(mask0) < 0.8


def test_seek_on_any_rank_continues_the_uninterrupted_sequence():
    full = BatchIterator(_IndexDataset(11), 2, seed=4, rank=1, world_size=3)
    seq = _epoch(full, 7)
    resumed = BatchIterator(_IndexDataset(11), 2, seed=4, rank=1, world_size=3)
    resumed.seek(4)
    np.testing.assert_array_equal(_epoch(resumed, 3), seq[8:])
    full.close()
    resumed.close()


def test_deterministic_order_reads_files_rank_plus_multiples_of_the_number_of_ranks():
    it = BatchIterator(_IndexDataset(7), 1, shuffle=False, rank=1, world_size=3)
    assert _epoch(it, 3)[:, 0].astype(int).tolist() == [1, 4, 0]  # files 1, 4 and the padding (file 0)
    it.close()


MPI_DRIVER = textwrap.dedent(
    """
    import json, os, sys
    import numpy as np
    from PIL import Image
    import guided_diffusion
    from guided_diffusion import dist_util
    from guided_diffusion.image_datasets import load_data

    folder, out = sys.argv[1], sys.argv[2]
    rank, world = dist_util.get_rank(), dist_util.get_world_size()
    B, EPOCHS = 4, 4
    per_epoch = 64 // (B * world)
    data = load_data(data_dir=folder, batch_size=B, image_size=8, class_cond=True)
    batches = [next(data) for _ in range(EPOCHS * per_epoch)]
    data.close()
    resumed = load_data(data_dir=folder, batch_size=B, image_size=8, class_cond=True)
    resumed.seek(5)
    continued = [next(resumed) for _ in range(3)]
    resumed.close()

    def decode(batch):
        x, c = batch
        ids = np.rint((x[:, 0, 0, 0] + 1) * 127.5 / 4).astype(int)  # row 0 holds 4 * file index
        flips = (x[:, 0, 1, 0] < x[:, 0, 1, -1]).astype(int)  # the bright column is on the left unless flipped
        return ids.tolist(), flips.tolist(), c["y"].tolist()

    rows = [decode(b) for b in batches]
    info = dict(ids=sum((r[0] for r in rows), []), flips=sum((r[1] for r in rows), []),
                labels=sum((r[2] for r in rows), []), per_epoch=per_epoch * B,
                resumed_ids=sum((decode(b)[0] for b in continued), []),
                uninterrupted_ids=sum((r[0] for r in rows[5:8]), []))
    with open(os.path.join(out, "rank%d.json" % rank), "w") as f:
        json.dump(info, f)
    """
)


def _class_sorted_flip_folder(folder):
    """c0_00.png ... c7_07.png: row 0 encodes the file index, the left column is bright (the flip shows)."""
    os.makedirs(folder)
    for c in range(8):
        for j in range(8):
            arr = np.zeros((8, 8, 3), np.uint8)
            arr[0] = 4 * (8 * c + j)
            arr[1:, 0] = 255
            Image.fromarray(arr).save(os.path.join(folder, "c%d_%02d.png" % (c, j)))


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="OpenMPI is not installed (make setup installs it)")
def test_under_mpirun_ranks_read_independent_labels_and_flips_and_cover_each_epoch_once(tmp_path):
    folder = str(tmp_path / "imgs")
    _class_sorted_flip_folder(folder)
    script = tmp_path / "driver.py"
    script.write_text(MPI_DRIVER)
    proc = subprocess.run(["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "2", sys.executable,
                           str(script), folder, str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / ("rank%d.json" % r)).read_text()) for r in (0, 1))
    labels0, labels1 = np.array(r0["labels"]), np.array(r1["labels"])
    np.testing.assert_array_equal(labels0, np.array(r0["ids"]) // 8)  # labels are the file-name classes
    label_agreement = np.mean(labels0 == labels1)
    flip_agreement = np.mean(np.array(r0["flips"]) == np.array(r1["flips"]))
    print("label agreement %.3f, flip agreement %.3f" % (label_agreement, flip_agreement))
    assert label_agreement < 0.3  # chance: 7/63; in lockstep it was 1.0
    assert 0.3 < flip_agreement < 0.7  # chance: 1/2; in lockstep it was 1.0
    n = r0["per_epoch"]
    for e in range(4):
        epoch_ids = r0["ids"][e * n:(e + 1) * n] + r1["ids"][e * n:(e + 1) * n]
        assert sorted(epoch_ids) == list(range(64))  # the dataset exactly once per epoch
    assert r0["ids"][:n] != r0["ids"][n:2 * n]  # each epoch is a new order
    for r in (r0, r1):
        assert r["resumed_ids"] == r["uninterrupted_ids"]


def _folder_with_bad_images(folder, n_good, bad_names):
    _write_images(folder, ["c%d_%03d.png" % (i % 2, i) for i in range(n_good)], size=(8, 8))
    for name in bad_names:
        (folder / name).write_bytes(b"this is not a png")
    return str(folder)


def test_an_unreadable_image_is_skipped_once_with_a_warning_and_replaced_deterministically(tmp_path):
    data_dir = _folder_with_bad_images(tmp_path, 120, ["c0_bad.png"])
    warnings = []

    def batches(seek=0):
        data = load_data(data_dir=data_dir, batch_size=11, image_size=8, class_cond=True)
        data.warn = warnings.append
        data.seek(seek)
        out = [next(data) for _ in range(22 - seek)]  # two epochs
        bad = data.bad_images
        data.close()
        return out, bad

    first, bad = batches()
    assert bad == 1 and len(warnings) == 1  # once per file, although both epochs met it
    assert "c0_bad.png" in warnings[0] and "another image takes its place" in warnings[0]
    assert all(x.shape == (11, 3, 8, 8) for x, _ in first)
    again, _ = batches(seek=15)  # a resumed iterator meets the same replacement
    for (x, c), (y, d) in zip(first[15:], again):
        np.testing.assert_array_equal(x, y)
        np.testing.assert_array_equal(c["y"], d["y"])


def test_more_than_one_percent_unreadable_images_stop_with_an_error_naming_them(tmp_path):
    data_dir = _folder_with_bad_images(tmp_path, 60, ["c0_bad%d.png" % i for i in range(3)])
    data = load_data(data_dir=data_dir, batch_size=9, image_size=8, class_cond=True)
    data.warn = lambda message: None
    with pytest.raises(DataError, match=r"of the \d+ images read so far are unreadable.*c0_bad"):
        for _ in range(14):  # two epochs
            next(data)
    data.close()
