"""Your own data, start to finish, with image_train.py (issue 27): class sub-folders with any file names, previews
while training that change nothing in training, --max_steps, fine-tuning the checkpoint onto more classes, and
sampling only the trained classes."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from guided_diffusion.checkpoint import load_file
from guided_diffusion.image_datasets import ArrayDataset
from guided_diffusion.training.preview import MAX_PREVIEW_CLASSES, PREVIEW_COLUMNS, preview_labels, \
    superres_preview_inputs
from test_image_train import run_script

TINY = ["--image_size", "32", "--num_channels", "16", "--num_res_blocks", "1", "--channel_mult", "1,2",
        "--attention_resolutions", "16", "--diffusion_steps", "50", "--class_cond", "True", "--learn_sigma", "True",
        "--batch_size", "2", "--log_interval", "1", "--save_interval", "100"]


def _class_folders(root, names, per_class=3):
    rng = np.random.RandomState(len(names))
    for c, name in enumerate(names):
        os.makedirs(os.path.join(str(root), name), exist_ok=True)
        for i in range(per_class):  # file names without "_": the prefix rule would see one class per file
            Image.fromarray(rng.randint(0, 256, (32, 32, 3), dtype=np.uint8)).save(
                os.path.join(str(root), name, "IMG%d%d.png" % (c, i)))
    return str(root)


def _ok(proc):
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def test_preview_labels_are_a_row_per_class_up_to_eight():
    assert preview_labels(None) is None
    assert preview_labels(3).tolist() == sum([[c] * PREVIEW_COLUMNS for c in range(3)], [])
    assert len(preview_labels(1000)) == MAX_PREVIEW_CLASSES * PREVIEW_COLUMNS


def test_superres_preview_inputs_are_the_first_images_downsampled_with_their_labels_and_shown_upsampled():
    images = np.random.RandomState(0).randint(0, 256, (10, 16, 16, 3)).astype(np.uint8)
    dataset = ArrayDataset(16, images, labels=np.arange(10) % 3, random_flip=False)
    kwargs, beside = superres_preview_inputs(dataset, small_size=4)
    assert kwargs["low_res"].shape == (2 * PREVIEW_COLUMNS, 3, 4, 4)
    assert kwargs["y"].tolist() == [0, 1, 2, 0, 1, 2, 0, 1]
    first = images[0].astype(np.float32) / 127.5 - 1
    np.testing.assert_allclose(kwargs["low_res"][0, 0, 0, 0], first[:4, :4, 0].mean(), rtol=1e-5)
    assert beside.shape == (2 * PREVIEW_COLUMNS, 16, 16, 3) and beside.dtype == np.uint8
    assert (beside[0, :4, :4] == beside[0, 0, 0]).all()  # each low-resolution pixel as a 4x4 block


@pytest.mark.scenario
def test_previews_are_written_and_change_nothing_in_training_and_max_steps_stops_the_run(tmp_path):
    data = _class_folders(tmp_path / "data", ["cat", "dog", "fox"])
    common = ["--data_dir", data, "--num_classes", "3", "--max_steps", "4"] + TINY
    plain = _ok(run_script(common, tmp_path / "plain"))
    with_previews = _ok(run_script(common + ["--preview_interval", "2"], tmp_path / "preview"))
    # the run stopped at --max_steps with a complete set
    assert sorted(f for f in os.listdir(str(tmp_path / "plain")) if f.endswith(".pt")) == [
        "ema_0.9999_000004.pt", "model000004.pt", "opt000004.pt"]
    assert json.load(open(str(tmp_path / "plain" / "classes.json"))) == ["cat", "dog", "fox"]
    # previews at steps 2 and 4, a row per class
    for step in (2, 4):
        grid = np.asarray(Image.open(str(tmp_path / "preview" / ("preview_%06d.png" % step))))
        assert grid.shape == (2 + 3 * 34, 2 + PREVIEW_COLUMNS * 34, 3)
    log = (tmp_path / "preview" / "log.txt").read_text()
    assert "preview after step 2:" in log and "preview after step 4:" in log
    # the weights and the loss curve are the same with and without previews
    for name in ("model000004.pt", "ema_0.9999_000004.pt", "opt000004.pt"):
        a, b = load_file(str(tmp_path / "plain" / name)), load_file(str(tmp_path / "preview" / name))
        for k in a:
            if isinstance(a[k], np.ndarray):
                np.testing.assert_array_equal(a[k], b[k], err_msg="%s %s" % (name, k))
    losses = [line.split(",")[0:3] for line in (tmp_path / "plain" / "progress.csv").read_text().splitlines()]
    assert losses == [line.split(",")[0:3]
                      for line in (tmp_path / "preview" / "progress.csv").read_text().splitlines()]

    # fine-tuning that checkpoint onto five classes: the label table is re-initialised, the rest loaded
    more = _class_folders(tmp_path / "more", ["ant", "bee", "cat", "dog", "fox"])
    tuned = _ok(run_script(["--data_dir", more, "--num_classes", "5", "--max_steps", "2",
                            "--finetune_from", str(tmp_path / "plain" / "model000004.pt")] + TINY, tmp_path / "tuned"))
    log = (tmp_path / "tuned" / "log.txt").read_text()
    assert "label_emb.weight" in log and "3x" in log and "5x" in log, log[-3000:]
    start = load_file(str(tmp_path / "plain" / "model000004.pt"))
    tuned_model = load_file(str(tmp_path / "tuned" / "model000002.pt"))
    assert tuned_model["label_emb.weight"].shape[0] == 5
    assert set(start) == set(tuned_model)
    assert "step" in (tmp_path / "tuned" / "progress.csv").read_text().splitlines()[0]
    assert not os.path.exists(str(tmp_path / "tuned" / "model000004.pt"))  # it started at step 0


def test_finetune_from_a_missing_file_or_with_a_resume_is_refused_before_anything_is_built(tmp_path):
    data = _class_folders(tmp_path / "data", ["cat", "dog"])
    proc = run_script(["--data_dir", data, "--num_classes", "2", "--finetune_from", str(tmp_path / "nope.pt"),
                       "--resume_checkpoint", str(tmp_path / "model000004.pt")] + TINY, tmp_path / "log")
    assert proc.returncode == 2
    assert "--finetune_from" in proc.stderr and "--resume_checkpoint" in proc.stderr
