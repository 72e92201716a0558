"""The class rule shared by the ADM loader and DiT (class_labels.find_classes), classes.json, and the data checks."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from guided_diffusion import class_labels, logger
from guided_diffusion.errors import DataError, UserError
from guided_diffusion.image_datasets import _list_image_files_recursively, check_data_classes, load_data


def _touch_images(root, relpaths, size=8):
    for i, rel in enumerate(relpaths):
        path = os.path.join(str(root), rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.fromarray(np.full((size, size, 3), 10 * i % 255, dtype=np.uint8)).save(path)


def _listing(root, class_from="auto"):
    return class_labels.find_classes(str(root), _list_image_files_recursively(str(root)), class_from)


def test_class_subfolders_give_the_labels_whatever_the_file_names(tmp_path):
    _touch_images(tmp_path, ["dog/IMG_0002.png", "cat/IMG_0001.png", "cat/photo.png", "bird/x_1.png"])
    listing = _listing(tmp_path)
    assert listing.rule == "folder"
    assert listing.class_names == ["bird", "cat", "dog"]
    names = [os.path.relpath(f, str(tmp_path)) for f in listing.files]
    assert dict(zip(names, listing.labels)) == {"bird/x_1.png": 0, "cat/IMG_0001.png": 1, "cat/photo.png": 1,
                                                "dog/IMG_0002.png": 2}
    assert listing.counts == {"bird": 1, "cat": 2, "dog": 1}


def test_disagreeing_rules_are_named_with_the_flag_that_switches(tmp_path):
    _touch_images(tmp_path, ["cat/IMG_0001.png", "dog/IMG_0002.png"])
    listing = _listing(tmp_path)
    assert listing.rule == "folder"
    assert "--class_from filename" in listing.notice and "IMG" in listing.notice
    by_name = _listing(tmp_path, "filename")
    assert by_name.class_names == ["IMG"] and by_name.labels == [0, 0] and by_name.notice is None


def test_imagenet_layout_gives_exactly_the_reference_labels(tmp_path):
    wnids = ["n01440764", "n01443537", "n01484850"]
    rel = ["train/%s/%s_%d.JPEG" % (w, w, k) for w in reversed(wnids) for k in (10026, 2708)]
    _touch_images(tmp_path, rel)
    root = tmp_path / "train"
    files = _list_image_files_recursively(str(root))
    # the reference (guided_diffusion/image_datasets.py @22e0df8): sorted unique file-name prefixes -> index
    prefixes = [os.path.basename(p).split("_")[0] for p in files]
    reference = {x: i for i, x in enumerate(sorted(set(prefixes)))}
    listing = _listing(root)
    assert listing.labels == [reference[x] for x in prefixes]
    assert listing.class_names == wnids
    assert listing.notice is None  # the two rules agree: nothing to announce
    assert _listing(root, "filename").labels == listing.labels == _listing(root, "folder").labels


def test_flat_folder_keeps_the_file_name_prefix_rule(tmp_path):
    _touch_images(tmp_path, ["dog_1.png", "cat_2.png", "cat_3.png"])
    listing = _listing(tmp_path)
    assert listing.rule == "filename" and listing.class_names == ["cat", "dog"]
    assert listing.labels == [0, 0, 1]  # sorted files: cat_2, cat_3, dog_1
    assert listing.notice is None


def test_loose_images_beside_subfolders_fall_back_to_prefixes_with_a_notice(tmp_path):
    _touch_images(tmp_path, ["a_1.png", "sub1/b_2.png", "sub2/c_3.png"])
    listing = _listing(tmp_path)
    assert listing.rule == "filename" and listing.class_names == ["a", "b", "c"]
    assert "directly in it" in listing.notice
    with pytest.raises(DataError, match="--class_from folder: 1 image"):
        _listing(tmp_path, "folder")


def test_single_subfolder_uses_prefixes_and_says_how_to_use_the_folder(tmp_path):
    _touch_images(tmp_path, ["images/cat_1.png", "images/dog_2.png"])
    listing = _listing(tmp_path)
    assert listing.rule == "filename" and listing.class_names == ["cat", "dog"]
    assert "--class_from folder" in listing.notice
    assert _listing(tmp_path, "folder").class_names == ["images"]


def test_images_in_nested_folders_belong_to_their_top_level_subfolder(tmp_path):
    _touch_images(tmp_path, ["cat/a/b/1.png", "dog/2.png"])
    assert _listing(tmp_path).labels == [0, 1]


def test_unknown_rule_is_refused():
    with pytest.raises(UserError, match="--class_from 'name'"):
        class_labels.find_classes("x", [], "name")


def test_more_classes_than_num_classes_is_refused_with_the_fix(tmp_path):
    _touch_images(tmp_path, ["a/1.png", "b/2.png", "c/3.png"])
    with pytest.raises(DataError, match="3 classes, more than --num_classes 2: pass --num_classes 3"):
        check_data_classes(str(tmp_path), num_classes=2)
    assert check_data_classes(str(tmp_path), num_classes=3).num_classes == 3


def test_load_data_writes_classes_json_and_logs_counts(tmp_path):
    data_dir = tmp_path / "data"
    _touch_images(data_dir, ["cat/IMG_1.png", "cat/IMG_2.png", "dog/IMG_3.png", "fox/IMG_4.png"])
    logdir = tmp_path / "log"
    logger.configure(dir=str(logdir), format_strs=["log"])
    try:
        data = load_data(data_dir=str(data_dir), batch_size=4, image_size=8, class_cond=True, deterministic=True,
                         random_flip=False, num_classes=5)
        _, cond = next(data)
        data.close()
    finally:
        logger.configure(dir=str(tmp_path / "other"), format_strs=[])
    assert json.loads((logdir / "classes.json").read_text()) == ["cat", "dog", "fox"] == data.class_names
    assert list(cond["y"]) == [0, 0, 1, 2]
    log = (logdir / "log.txt").read_text()
    assert "4 images in 3 classes (from sub-folders)" in log
    assert "cat: 2, dog: 1, fox: 1" in log
    assert "--num_classes 5 label rows; the data uses the first 3" in log
    assert "--class_from filename" in log


def test_load_data_refuses_more_classes_than_num_classes(tmp_path):
    _touch_images(tmp_path, ["a/1.png", "b/2.png"])
    with pytest.raises(DataError, match="pass --num_classes 2"):
        load_data(data_dir=str(tmp_path), batch_size=1, image_size=8, class_cond=True, num_classes=1)


def test_validation_data_is_numbered_like_the_training_data(tmp_path):
    _touch_images(tmp_path, ["val/dog/1.png", "val/fox/2.png"])
    data = load_data(data_dir=str(tmp_path / "val"), batch_size=2, image_size=8, class_cond=True,
                     deterministic=True, random_flip=False, class_names=["cat", "dog", "fox"])
    _, cond = next(data)
    data.close()
    assert list(cond["y"]) == [1, 2]
    with pytest.raises(DataError, match="fox"):
        load_data(data_dir=str(tmp_path / "val"), batch_size=2, image_size=8, class_cond=True,
                  class_names=["cat", "dog"])


def test_summary_of_many_classes_gives_the_range():
    listing = class_labels.ClassListing([], [], ["c%02d" % i for i in range(30)], "folder",
                                        counts={"c%02d" % i: 10 + i for i in range(30)})
    lines = class_labels.summary_lines(listing)
    assert lines[1].startswith("images per class: 10 to 39 (fewest: c00, most: c29)")


def test_classes_json_round_trips_and_is_found_beside_a_checkpoint(tmp_path):
    class_labels.write_classes(str(tmp_path), ["b", "a"])
    ckpt = tmp_path / "ema_0.9999_000010.pt"
    ckpt.write_bytes(b"")
    found = class_labels.classes_beside(str(ckpt))
    assert found == str(tmp_path / "classes.json")
    assert class_labels.read_classes(found) == ["b", "a"]
    assert class_labels.classes_beside(str(tmp_path / "sub" / "x.pt")) is None
    (tmp_path / "classes.json").write_text('{"a": 1}')
    with pytest.raises(UserError, match="not a JSON list"):
        class_labels.read_classes(found)


def test_image_train_with_more_classes_than_num_classes_stops_before_building_with_the_fix(tmp_path):
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _touch_images(tmp_path / "data", ["cat/a.png", "dog/b.png", "fox/c.png"])
    env = dict(os.environ, OPENAI_LOGDIR=str(tmp_path / "log"))
    proc = subprocess.run([sys.executable, os.path.join(repo, "image_train.py"), "--data_dir", str(tmp_path / "data"),
                           "--class_cond", "True", "--num_classes", "2", "--image_size", "32"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "has 3 classes, more than --num_classes 2: pass --num_classes 3" in proc.stderr
    assert not (tmp_path / "log").exists()  # nothing was started
