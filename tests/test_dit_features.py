"""DiT's fast path: extract_features.py (shards, resume, counts), train.py --feature-path (the same steps as from
images, checkpoints that resume across the two paths, flips) and --grad-checkpoint (the same gradients)."""

import argparse
import os
import random

import numpy as np
import pytest
from PIL import Image

import guided_diffusion  # noqa: F401  (prepares Jittor before it is imported)
import jittor as jt

from guided_diffusion.checkpoint import load_file
from guided_diffusion.errors import InputCheck
from guided_diffusion.image_datasets import BatchIterator, ImageDataset
from test_dit_scripts import TINY_MODEL, VAE_DIR, _image_folder, _logged_losses, _run

import dit_util  # noqa: E402  (test_dit_scripts put DiT/ on sys.path)
import features  # noqa: E402
from autoencoder import AutoencoderKL  # noqa: E402
from models import DiT  # noqa: E402

TRAIN = TINY_MODEL + ["--num-classes", "2", "--batch-size", "2", "--epochs", "1", "--log-every", "1",
                      "--ckpt-every", "1"]


def _extract(data, out, cwd, *extra, expect_ok=True):
    args = ["--data-path", str(data), "--features-path", str(out), "--image-size", "32", "--vae-path", VAE_DIR]
    return _run("extract_features.py", args + list(extra), cwd, expect_ok=expect_ok)


def _feature_args(folder, image_size=32, num_classes=2):
    return argparse.Namespace(feature_path=str(folder), image_size=image_size, num_classes=num_classes)


def test_disk_size_per_image_at_256px():
    # 2 views x (mean + std) x 4 x 32 x 32 float32 = 64 KiB per image, 65.5 MB (62.5 MiB) per 1,000 images
    assert features.bytes_per_image((4, 32, 32)) == 65536


def test_extraction_writes_shards_resumes_and_checks_counts(tmp_path):
    data = _image_folder(str(tmp_path / "data"), per_class=3)  # 6 images -> shards of 4 and 2
    out = tmp_path / "feats"
    first = _extract(data, out, tmp_path, "--batch-size", "3", "--shard-size", "4", "--max-shards", "1")
    assert "1 of 2 shards are complete" in first.stdout
    assert (out / "shard_00000.npy").exists() and not (out / "shard_00001.npy").exists()
    assert not (out / "index.json").exists()
    problems = InputCheck()
    assert features.check_feature_inputs(problems, _feature_args(out)) is None
    assert "incomplete (1 of 2 shards" in problems.problems[0]

    stamp = os.stat(out / "shard_00000.npy").st_mtime_ns
    second = _extract(data, out, tmp_path, "--batch-size", "3", "--shard-size", "4")
    assert "1 shard(s) of this process are complete and skipped" in second.stdout
    assert os.stat(out / "shard_00000.npy").st_mtime_ns == stamp
    index = features.check_feature_inputs(InputCheck(), _feature_args(out))
    assert index["num_images"] == 6 and index["num_shards"] == 2 and index["latent_shape"] == [4, 16, 16]
    assert index["classes"] == ["cat", "dog"] and index["vae"] == "vae_tiny" and index["shard_size"] == 4
    np.testing.assert_array_equal(np.load(out / "labels.npy"), [0, 0, 0, 1, 1, 1])
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]

    # The content: the posterior mean and std of train.py's centre crop and of its mirror.
    vae = AutoencoderKL.from_pretrained(VAE_DIR)
    files, _, _ = dit_util.list_image_folder(data)
    crops = np.stack([ImageDataset(32, files, random_flip=False).get(i, random)[0] for i in range(6)])
    shards = np.concatenate([np.load(out / "shard_00000.npy"), np.load(out / "shard_00001.npy")])
    for view, images in ((0, crops), (1, np.ascontiguousarray(crops[..., ::-1]))):
        with jt.no_grad():
            posterior = vae.encode(jt.array(images)).latent_dist
            np.testing.assert_allclose(shards[:, view, 0], posterior.mean.numpy(), rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(shards[:, view, 1], posterior.std.numpy(), rtol=1e-5, atol=1e-5)

    # An interruption that lost the last shard and the index: only that shard is written again, identically.
    before = (out / "shard_00001.npy").read_bytes()
    os.remove(out / "shard_00001.npy")
    os.remove(out / "index.json")
    (out / ".shard_00001.npy.abc.tmp").write_bytes(b"partial")  # what a killed run leaves
    problems = InputCheck()
    features.check_feature_inputs(problems, _feature_args(out))
    assert "incomplete" in problems.problems[0] and "extract_features.py again" in problems.problems[0]
    _extract(data, out, tmp_path, "--batch-size", "3", "--shard-size", "4")
    assert (out / "shard_00001.npy").read_bytes() == before
    assert os.stat(out / "shard_00000.npy").st_mtime_ns == stamp
    assert (out / "index.json").exists() and not (out / ".shard_00001.npy.abc.tmp").exists()

    # another extraction into the same folder is refused, naming what differs
    proc = _extract(data, out, tmp_path, "--shard-size", "3", expect_ok=False)
    assert proc.returncode == 2 and "another extraction" in proc.stderr and "shard_size" in proc.stderr


def _fake_encoder(images):
    """mean: the image itself plus a zero channel; std: |image| + 0.1 (so a sample shows which view it came from)."""
    mean = np.concatenate([images, np.zeros_like(images[:, :1])], axis=1)
    return mean, np.abs(mean) + 0.1


def _small_folder(root, n, bad=()):
    rng = np.random.RandomState(1)
    for i in range(n):
        path = os.path.join(root, "c%d" % (i % 3), "%03d.png" % i)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if i in bad:
            with open(path, "wb") as f:
                f.write(b"not an image")
        else:
            Image.fromarray(rng.randint(0, 255, size=(8, 10, 3), dtype=np.uint8)).save(path)
    return dit_util.list_image_folder(root)


def test_feature_batches_equal_image_batches_and_flip_about_half(tmp_path):
    files, labels, classes = _small_folder(str(tmp_path / "data"), 201, bad={7})
    out = str(tmp_path / "feats")
    plan = features.feature_plan(files, classes, 8, (4, 8, 8), 32, "fake", str(tmp_path / "data"))
    warnings = []
    # two "ranks", one after the other: rank 1 writes shards 1, 3, 5, rank 0 the others and the index
    assert features.extract_features(out, plan, files, labels, _fake_encoder, batch_size=5, rank=1, world_size=2,
                                     log=lambda m: None, warn=warnings.append) is None
    index = features.extract_features(out, plan, files, labels, _fake_encoder, batch_size=5, rank=0, world_size=2,
                                      log=lambda m: None, warn=warnings.append)
    bad = next(i for i, f in enumerate(files) if f.endswith("007.png"))
    assert index["num_shards"] == 7 and list(index["unreadable"]) == [str(bad)]
    assert len(warnings) == 1 and "unreadable image" in warnings[0]

    feats = features.FeatureDataset(out)
    images = ImageDataset(8, files, classes=labels, random_flip=True)
    flipped = skipped = 0
    for rank in (0, 1):  # the same order, flips, labels and skipped image per rank (2 ranks, batch 4)
        a = BatchIterator(feats, 4, seed=3, rank=rank, world_size=2, warn=lambda m: None)
        b = BatchIterator(images, 4, seed=3, rank=rank, world_size=2, warn=lambda m: None)
        for k in range(a.batches_per_epoch):
            (moments, cond_f), (pixels, cond_i) = a.make_batch(k), b.make_batch(k)
            mean, std = _fake_encoder(pixels)
            np.testing.assert_array_equal(moments[:, 0], mean)
            np.testing.assert_array_equal(moments[:, 1], std)
            np.testing.assert_array_equal(cond_f["y"], cond_i["y"])
            for j, (epoch, position) in enumerate(a.sample_keys(k)):
                idx = int(a.epoch_order(epoch)[position])
                if idx != bad:  # (its place holds the next image of the order)
                    flipped += not np.array_equal(pixels[j], images.get(idx, _NoFlip())[0])
        assert a.bad_images == b.bad_images
        skipped += a.bad_images
    assert skipped == 1
    total = 2 * a.batches_per_epoch * 4
    assert 0.4 < flipped / total < 0.6, (flipped, total)


class _NoFlip:
    """An rng whose draws never flip (random() is 0.99)."""

    def random(self):
        return 0.99


def test_training_refuses_features_that_do_not_fit_the_flags(tmp_path):
    files, labels, classes = _small_folder(str(tmp_path / "data"), 6)
    out = str(tmp_path / "feats")
    plan = features.feature_plan(files, classes, 8, (4, 2, 2), 4, "fake", str(tmp_path / "data"))
    features.extract_features(out, plan, files, labels, lambda x: tuple(m[:, :, ::4, ::4] for m in _fake_encoder(x)),
                              batch_size=2, log=lambda m: None)
    check = InputCheck()
    assert features.check_feature_inputs(check, _feature_args(out, image_size=16, num_classes=2)) is None
    assert len(check.problems) == 2
    assert "--image-size 8, not 16: pass --image-size 8" in check.problems[0]
    assert "3 classes, more than --num-classes 2: pass --num-classes 3" in check.problems[1]
    check = InputCheck()
    features.check_feature_inputs(check, _feature_args(tmp_path / "nothing"))
    assert "extract_features.py" in check.problems[0]
    proc = _run("train.py", TINY_MODEL + ["--feature-path", out, "--num-classes", "2"], tmp_path, expect_ok=False)
    assert proc.returncode == 2 and "2 problems" in proc.stderr and "pass --image-size 8" in proc.stderr
    assert "VAE" not in proc.stderr  # no VAE is needed
    proc = _run("train.py", TINY_MODEL + ["--feature-path", out, "--data-path", out], tmp_path, expect_ok=False)
    assert proc.returncode == 2 and "give either --data-path (images) or --feature-path" in proc.stderr


@pytest.fixture(scope="module")
def paired_runs(tmp_path_factory):
    """Two steps from images and from features (extracted with a VAE batch of 2 = train.py's, so the VAE rounds
    alike), and the step-2 checkpoints of a run resumed from step 1 on the other path."""
    tmp = tmp_path_factory.mktemp("paired")
    data = _image_folder(str(tmp / "data"))
    _extract(data, tmp / "feats", tmp, "--batch-size", "1", "--shard-size", "3")
    runs = {}
    for name, source in (("images", ["--data-path", data]), ("features", ["--feature-path", str(tmp / "feats")]),
                         ("features_ckpt", ["--feature-path", str(tmp / "feats"), "--grad-checkpoint",
                                            "--preview-every", "2"])):  # previews load the VAE for themselves
        _run("train.py", TRAIN + source + ["--results-dir", name], tmp)
        runs[name] = tmp / name / "000-DiT-S-4"
    for name, first, source in (("images_then_features", "images", ["--feature-path", str(tmp / "feats")]),
                                ("features_then_images", "features", ["--data-path", data])):
        resume = str(runs[first] / "checkpoints" / "0000001.pt")
        _run("train.py", TRAIN + source + ["--results-dir", name, "--resume", resume], tmp)
        runs[name] = tmp / name / "000-DiT-S-4"
    return runs


def _compare(a_dir, b_dir, step=2, atol_scale=0.0):
    """assert_allclose(rtol=1e-5, atol=atol_scale * max |tensor|) over model, EMA and AdamW state; returns the
    worst relative difference."""
    a, b = (load_file(str(d / "checkpoints" / ("%07d.pt" % step))) for d in (a_dir, b_dir))
    pairs = [(k + "." + n, v, b[k][n]) for k in ("model", "ema") for n, v in a[k].items()]
    for pid, state in a["opt"]["state"].items():
        pairs += [("opt.%s.%s" % (pid, n), np.asarray(v), np.asarray(b["opt"]["state"][pid][n]))
                  for n, v in state.items()]
    worst = 0.0
    for name, x, y in pairs:
        np.testing.assert_allclose(y, x, rtol=1e-5, atol=atol_scale * float(np.abs(x).max(initial=0.0)),
                                   err_msg=name)
        worst = max(worst, float(np.max(np.abs(x - y) / np.maximum(np.abs(x), 1e-30), initial=0.0)))
    print("worst relative difference %s vs %s: %g" % (a_dir.parent.name, b_dir.parent.name, worst))
    return worst


def test_a_step_from_features_equals_a_step_from_images(paired_runs):
    for step in (1, 2):
        _compare(paired_runs["images"], paired_runs["features"], step)
    assert _logged_losses(paired_runs["images"] / "log.txt") == _logged_losses(paired_runs["features"] / "log.txt")
    log = (paired_runs["features"] / "log.txt").read_text()
    assert "Dataset contains 4 images" in log and "in 2 classes" in log


def test_checkpoints_resume_on_the_other_path(paired_runs):
    # Step 2 of a run resumed from step 1 on the other path is step 2 of the uninterrupted run of that path: the
    # data order (seek), flips, noise and timesteps of step 2 and the AdamW moments carry over between the paths.
    _compare(paired_runs["features"], paired_runs["images_then_features"])
    _compare(paired_runs["images"], paired_runs["features_then_images"])
    losses = _logged_losses(paired_runs["features"] / "log.txt")
    assert _logged_losses(paired_runs["images_then_features"] / "log.txt") == {2: losses[2]}
    # ...which the tolerance tells from a run that did not take step 2 (or took another one)
    one, two = (load_file(str(paired_runs["features"] / "checkpoints" / n)) for n in ("0000001.pt", "0000002.pt"))
    with pytest.raises(AssertionError):
        np.testing.assert_allclose(two["model"]["x_embedder.proj.weight"], one["model"]["x_embedder.proj.weight"],
                                   rtol=1e-5)


def test_grad_checkpoint_training_run_matches(paired_runs):
    # the recompute sums the gradients in another order: float32 round-off (about 1e-11 on weights that are about
    # 1e-4 after two steps from their zero initialisation); that run also wrote a preview, decoded by the VAE
    _compare(paired_runs["features"], paired_runs["features_ckpt"], atol_scale=1e-6)
    assert (paired_runs["features_ckpt"] / "preview_000002.png").exists()


def test_grad_checkpoint_gives_every_parameter_the_same_gradient():
    jt.set_global_seed(0)
    model = DiT(input_size=8, patch_size=2, hidden_size=32, depth=2, num_heads=2, num_classes=3)
    for p in model.parameters():  # away from the zero initialisation, so every gradient is non-trivial
        if not p.is_stop_grad():
            p.assign(jt.array(np.random.RandomState(p.numel()).randn(*p.shape).astype(np.float32) * 0.2))
    model.eval()  # no label dropout: both passes see the same labels
    rng = np.random.RandomState(0)
    x = jt.array(rng.randn(2, 4, 8, 8).astype(np.float32))
    t = jt.array(np.array([3, 700], dtype=np.int32))
    y = jt.array(np.array([0, 2], dtype=np.int32))
    weight = jt.array(rng.randn(2, 8, 8, 8).astype(np.float32))
    named = [(n, p) for n, p in model.named_parameters() if not p.is_stop_grad()]
    grads = {}
    for flag in (False, True):
        model.use_checkpoint = flag
        loss = (model(x, t, y) * weight).sum()
        grads[flag] = [g.numpy() for g in jt.grad(loss, [p for _, p in named])]
    for (name, _), plain, recomputed in zip(named, grads[False], grads[True]):
        assert np.abs(plain).max() > 0, name
        np.testing.assert_allclose(recomputed, plain, rtol=1e-5, atol=1e-6 * np.abs(plain).max(), err_msg=name)


def test_the_scripts_accept_the_new_flags():
    import extract_features
    import train

    args = train.create_argparser().parse_args(["--feature-path", "f", "--grad-checkpoint"])
    assert args.feature_path == "f" and args.grad_checkpoint and args.data_path is None
    args = extract_features.create_argparser().parse_args(["--data-path", "d", "--features-path", "f"])
    assert (args.batch_size, args.shard_size, args.max_shards, args.image_size) == (32, 1024, 0, 256)


def test_dit_listing_keeps_imagefolder_order_and_labels_for_class_subfolders(tmp_path):
    root = tmp_path / "data"
    for rel in ("dog/b/IMG_3.png", "dog/IMG_2.png", "cat/IMG_1.png", "cat/z.webp"):
        os.makedirs(os.path.dirname(str(root / rel)), exist_ok=True)
        Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)).save(str(root / rel))
    files, labels, classes = listing = dit_util.list_image_folder(str(root))
    # torchvision ImageFolder: sorted classes, each class folder walked (os.walk, sorted), its extensions
    assert [os.path.relpath(f, str(root)) for f in files] == ["cat/IMG_1.png", "cat/z.webp", "dog/IMG_2.png",
                                                              "dog/b/IMG_3.png"]
    assert labels == [0, 0, 1, 1] and classes == ["cat", "dog"]
    assert "--class-from filename" in listing.notice
    with pytest.raises(guided_diffusion.errors.DataError, match="more than --num-classes 1: pass --num-classes 2"):
        dit_util.list_image_folder(str(root), num_classes=1)


def test_dit_listing_of_a_flat_folder_takes_the_file_name_prefix(tmp_path):
    for name in ("b_1.png", "a_2.png", "a_3.png"):
        Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)).save(str(tmp_path / name))
    files, labels, classes = dit_util.list_image_folder(str(tmp_path))
    assert classes == ["a", "b"] and labels == [0, 0, 1]


def test_record_classes_writes_classes_json_and_logs_images_per_class(tmp_path):
    listing = dit_util.list_image_folder(_image_folder(str(tmp_path / "data"), per_class=3))
    lines = []
    features.record_classes(str(tmp_path), lines.append, listing, num_classes=4)
    assert (tmp_path / "classes.json").read_text().split() == ['[', '"cat",', '"dog"', ']']
    assert "6 images in 2 classes (from sub-folders)" in lines
    assert "images per class: cat: 3, dog: 3" in lines
    assert any("--num-classes 4 label rows; the data uses the first 2" in line for line in lines)
