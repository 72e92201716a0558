"""Tests of evaluations/make_reference_batch.py: a reference batch (arr_0 subset + precomputed mu/sigma/mu_s/sigma_s
over all images) built from an image folder or an .npz, on a tiny stand-in for the Inception graph."""

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "evaluations", "make_reference_batch.py")
sys.path.insert(0, os.path.join(REPO, "evaluations"))
sys.path.insert(0, os.path.join(REPO, "tests", "fixtures", "evaluator"))

import evaluator  # noqa: E402
import make_reference_batch as mrb  # noqa: E402
from tiny_inception import build_tiny_inception_graph  # noqa: E402

tf = evaluator.tf


@pytest.fixture(scope="module")
def tiny_graph(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("inception") / "tiny_inception.pb")
    build_tiny_inception_graph(path)
    return path


@pytest.fixture(scope="module")
def tiny_evaluator(tiny_graph):
    sess = tf.Session(graph=tf.Graph())
    yield evaluator.Evaluator(sess, inception_path=tiny_graph)
    sess.close()


def _check_statistics(batch, pool: np.ndarray, spatial: np.ndarray) -> None:
    np.testing.assert_allclose(batch["mu"], pool.astype(np.float64).mean(0), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(batch["sigma"], np.cov(pool, rowvar=False), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(batch["mu_s"], spatial.astype(np.float64).mean(0), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(batch["sigma_s"], np.cov(spatial, rowvar=False), rtol=1e-6, atol=1e-8)


def test_running_statistics_match_numpy_mean_and_cov_over_uneven_batches():
    x = np.random.RandomState(0).randn(53, 6) * 3 + 100  # a large mean tests the centring
    stats = mrb.RunningStatistics()
    for lo, hi in ((0, 1), (1, 20), (20, 21), (21, 53)):
        stats.update(x[lo:hi])
    mu, sigma = stats.statistics()
    np.testing.assert_allclose(mu, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), rtol=1e-9)


def test_center_crop_keeps_the_middle_of_the_short_side():
    wide = np.zeros((20, 60, 3), np.uint8)
    wide[:, 20:40] = (200, 10, 30)  # the middle third
    out = mrb.center_crop_arr(Image.fromarray(wide), 10)  # BOX-halved to 30x10, then the middle 10 columns
    assert out.shape == (10, 10, 3)
    assert (out == (200, 10, 30)).all()
    tall = np.full((33, 16, 3), 77, np.uint8)
    assert mrb.center_crop_arr(Image.fromarray(tall), 16).shape == (16, 16, 3)


def test_choose_subset_is_seeded_sorted_and_unique():
    a = mrb.choose_subset(100, 10, seed=3)
    assert list(a) == sorted(set(a)) and len(a) == 10 and a.max() < 100
    np.testing.assert_array_equal(a, mrb.choose_subset(100, 10, seed=3))
    assert not np.array_equal(a, mrb.choose_subset(100, 10, seed=4))
    np.testing.assert_array_equal(mrb.choose_subset(7, 10, seed=0), np.arange(7))


def test_folder_command_writes_reference_batch_with_statistics_of_all_images(tiny_graph, tiny_evaluator, tmp_path):
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.RandomState(1)
    for i in range(8):
        Image.fromarray(rng.randint(0, 256, (20 + i, 30, 3)).astype(np.uint8)).save(folder / f"{i}.png")
    for i in range(3):
        Image.fromarray(rng.randint(0, 256, (40, 25 + i, 3)).astype(np.uint8)).save(folder / "sub" / f"{i}.JPG")
    Image.fromarray(rng.randint(0, 256, (30, 30)).astype(np.uint8), mode="L").save(folder / "gray.png")
    (folder / "notes.txt").write_text("not an image")
    out = str(tmp_path / "ref.npz")
    env = dict(os.environ)
    env[evaluator.INCEPTION_URL_ENV] = "http://127.0.0.1:9/unused"  # nothing may be downloaded
    proc = subprocess.run(
        [sys.executable, SCRIPT, str(folder), out, "--image_size", "12", "--num_images", "5",
         "--inception_path", tiny_graph],
        cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "statistics over 12 images" in proc.stdout

    files = mrb.list_image_files(str(folder))
    assert len(files) == 12 and not any(f.endswith(".txt") for f in files)
    crops = np.stack([mrb.load_image(f, 12) for f in files])
    pool, spatial = tiny_evaluator.compute_activations([crops])
    with np.load(out) as batch:
        assert sorted(batch.files) == ["arr_0", "mu", "mu_s", "sigma", "sigma_s"]
        assert batch["arr_0"].dtype == np.uint8
        np.testing.assert_array_equal(batch["arr_0"], crops[mrb.choose_subset(12, 5, 0)])
        _check_statistics(batch, pool, spatial)
    assert evaluator.describe_npz(out).has_statistics


def test_npz_source_keeps_labels_of_chosen_images_and_statistics_across_batches(tiny_evaluator, tiny_graph, tmp_path):
    rng = np.random.RandomState(2)
    images = rng.randint(0, 256, (9, 12, 12, 3)).astype(np.uint8)
    labels = rng.randint(0, 1000, 9)
    src = str(tmp_path / "samples.npz")
    np.savez(src, images, labels)
    out = str(tmp_path / "ref.npz")
    mrb.main([src, out, "--num_images", "4", "--batch_size", "4", "--seed", "5", "--inception_path", tiny_graph])
    chosen = mrb.choose_subset(9, 4, 5)
    # The same batches of 4 as the tool: TF's float32 convolutions may round differently for another batch size.
    pool, spatial = tiny_evaluator.compute_activations([images[i : i + 4] for i in range(0, 9, 4)])
    with np.load(out) as batch:
        np.testing.assert_array_equal(batch["arr_0"], images[chosen])
        np.testing.assert_array_equal(batch["arr_1"], labels[chosen])
        _check_statistics(batch, pool, spatial)
    # The evaluator uses these precomputed statistics, not arr_0's.
    stats, stats_s = tiny_evaluator.read_statistics(out, (pool[chosen], spatial[chosen]))
    np.testing.assert_allclose(stats.sigma, np.cov(pool, rowvar=False), rtol=1e-6, atol=1e-8)
    assert stats_s.mu.shape == (2023,)


def test_existing_output_is_not_replaced(tmp_path, capsys):
    src = str(tmp_path / "samples.npz")
    np.savez(src, np.zeros((4, 8, 8, 3), np.uint8))
    out = tmp_path / "ref.npz"
    out.write_bytes(b"precious")
    with pytest.raises(SystemExit) as exc:
        mrb.run_cli(lambda: mrb.main([src, str(out)]))
    assert exc.value.code == 2
    assert "--overwrite" in capsys.readouterr().err
    assert out.read_bytes() == b"precious"


def test_folder_without_image_size_or_images_is_a_user_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(evaluator.EvaluatorError, match="--image_size is required"):
        mrb.main([str(tmp_path / "empty"), str(tmp_path / "a.npz")])
    with pytest.raises(evaluator.EvaluatorError, match="no images"):
        mrb.main([str(tmp_path / "empty"), str(tmp_path / "a.npz"), "--image_size", "8"])
