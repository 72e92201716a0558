"""Tests of evaluations/evaluator.py: the score maths against independent numpy computations, .npz streaming,
errors, and the whole command run on a tiny stand-in for the Inception graph (no download)."""

import os
import re
import socket
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EVALUATOR_SCRIPT = os.path.join(REPO, "evaluations", "evaluator.py")
sys.path.insert(0, os.path.join(REPO, "evaluations"))
sys.path.insert(0, os.path.join(REPO, "tests", "fixtures", "evaluator"))

import evaluator  # noqa: E402
from tiny_inception import build_tiny_inception_graph  # noqa: E402

tf = evaluator.tf


# ---------------------------------------------------------------------------------------------------------------
# helpers: independent computations


def _nuclear_fid(x1: np.ndarray, x2: np.ndarray) -> float:
    """FID of the sample statistics of two activation sets without sqrtm: with S = A^T A (A = centred rows /
    sqrt(N-1)), tr sqrt(S1 S2) is the sum of the singular values of A1 A2^T."""
    x1, x2 = x1.astype(np.float64), x2.astype(np.float64)
    a1 = (x1 - x1.mean(0)) / np.sqrt(len(x1) - 1)
    a2 = (x2 - x2.mean(0)) / np.sqrt(len(x2) - 1)
    diff = x1.mean(0) - x2.mean(0)
    tr_covmean = np.linalg.svd(a1 @ a2.T, compute_uv=False).sum()
    return float(diff @ diff + (a1 * a1).sum() + (a2 * a2).sum() - 2 * tr_covmean)


def _psd_sqrt(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(m)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def _gaussian_frechet(mu1, s1, mu2, s2) -> float:
    """Closed form W2^2 between N(mu1, s1) and N(mu2, s2) with symmetric square roots."""
    r1 = _psd_sqrt(s1)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(_psd_sqrt(r1 @ s2 @ r1)))


def _sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)


def _numpy_prec_recall(ref: np.ndarray, sample: np.ndarray):
    """Improved precision/recall with k=3 (self excluded), brute force in float64."""
    r_ref = np.sort(_sq_dists(ref, ref), axis=1)[:, 3]
    r_sample = np.sort(_sq_dists(sample, sample), axis=1)[:, 3]
    d = _sq_dists(ref, sample)
    precision = (d <= r_ref[:, None]).any(axis=0).mean()
    recall = (d <= r_sample[None, :]).any(axis=1).mean()
    return precision, recall, r_ref, r_sample


def _numpy_inception_score(pool: np.ndarray, w: np.ndarray, split_size: int) -> float:
    logits = pool.astype(np.float64) @ w.astype(np.float64)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    scores = []
    for i in range(0, len(p), split_size):
        part = p[i : i + split_size]
        marginal = part.mean(0, keepdims=True)
        scores.append(np.exp((part * (np.log(part) - np.log(marginal))).sum(1).mean()))
    return float(np.mean(scores))


def _closed_local_url() -> str:
    """A URL on localhost where nothing listens (a port just released), so a download fails at once."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/classify_image_graph_def.pb"


def _offline_env(monkeypatch) -> str:
    url = _closed_local_url()
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv(evaluator.INCEPTION_URL_ENV, url)
    monkeypatch.delenv(evaluator.INCEPTION_PATH_ENV, raising=False)
    return url


def _images(rng: np.random.RandomState, n: int, size: int) -> np.ndarray:
    """Images with varied colours and textures, so their activations spread out."""
    base = rng.randint(0, 256, size=(n, 1, 1, 3))
    noise = rng.randint(-60, 61, size=(n, size, size, 3)) * rng.rand(n, 1, 1, 1)
    return np.clip(base + noise, 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def tiny_graph(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("inception") / "tiny_inception.pb")
    w = build_tiny_inception_graph(path)
    return path, w


@pytest.fixture(scope="module")
def tiny_evaluator(tiny_graph):
    sess = tf.Session(graph=tf.Graph())
    ev = evaluator.Evaluator(sess, inception_path=tiny_graph[0])
    yield ev
    sess.close()


@pytest.fixture(scope="module")
def distance_session():
    sess = tf.Session(graph=tf.Graph())
    yield sess
    sess.close()


def _raw_activations(graph_path: str, images: np.ndarray):
    """pool_3 and the first 7 mixed_6/conv channels, from the graph directly (not through evaluator.py)."""
    graph = tf.Graph()
    with graph.as_default():
        ph = tf.placeholder(tf.float32, [None, None, None, 3])
        gd = tf.GraphDef()
        with open(graph_path, "rb") as f:
            gd.ParseFromString(f.read())
        pool, spatial = tf.import_graph_def(
            gd, input_map={"ExpandDims:0": ph}, return_elements=["pool_3:0", "mixed_6/conv:0"], name="raw"
        )
    with tf.Session(graph=graph) as sess:
        p, s = sess.run([pool, spatial], {ph: images.astype(np.float32)})
    return p.reshape(len(images), -1), s[..., :7].reshape(len(images), -1)


# ---------------------------------------------------------------------------------------------------------------
# FID / sFID maths


def test_frechet_distance_of_identical_statistics_is_zero():
    x = np.random.RandomState(0).randn(300, 12)
    stats = evaluator.Evaluator.compute_statistics(None, x)
    assert abs(stats.frechet_distance(stats)) < 1e-8


def test_frechet_distance_matches_gaussian_closed_form():
    rng = np.random.RandomState(1)
    d = 10
    mu1, mu2 = rng.randn(d), rng.randn(d)
    a, b = rng.rand(d) + 0.1, rng.rand(d) + 0.1
    # Diagonal covariances: FID = |mu1 - mu2|^2 + sum (sqrt a - sqrt b)^2.
    fid = evaluator.FIDStatistics(mu1, np.diag(a)).frechet_distance(evaluator.FIDStatistics(mu2, np.diag(b)))
    assert fid == pytest.approx(((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum(), rel=1e-10)
    # Non-commuting covariances.
    q, _ = np.linalg.qr(rng.randn(d, d))
    s1 = (q * a) @ q.T
    s2 = np.cov(rng.randn(50, d), rowvar=False)
    fid = evaluator.FIDStatistics(mu1, s1).frechet_distance(evaluator.FIDStatistics(mu2, s2))
    assert fid == pytest.approx(_gaussian_frechet(mu1, s1, mu2, s2), rel=1e-9)
    # One dimension (atleast_1d / atleast_2d).
    fid = evaluator.FIDStatistics(np.float64(1.0), np.float64(4.0)).frechet_distance(
        evaluator.FIDStatistics(np.float64(3.0), np.float64(1.0))
    )
    assert fid == pytest.approx(4.0 + 4.0 + 1.0 - 2 * 2.0)


def test_fid_of_activations_matches_independent_computation():
    rng = np.random.RandomState(2)
    x1 = rng.randn(200, 16) * rng.rand(16) + rng.randn(16)
    x2 = rng.randn(150, 16) @ rng.randn(16, 16) * 0.3
    ev = evaluator.Evaluator.__new__(evaluator.Evaluator)  # the statistics need no graph
    fid = ev.compute_statistics(x2).frechet_distance(ev.compute_statistics(x1))
    assert fid == pytest.approx(_nuclear_fid(x1, x2), rel=1e-9)


def test_compute_statistics_uses_unbiased_covariance():
    x = np.random.RandomState(3).rand(40, 5).astype(np.float32)
    stats = evaluator.Evaluator.compute_statistics(None, x)
    centred = x.astype(np.float64) - x.astype(np.float64).mean(0)
    np.testing.assert_allclose(stats.sigma, centred.T @ centred / (len(x) - 1), rtol=1e-6)
    np.testing.assert_allclose(stats.mu, x.mean(0), rtol=1e-6)


def test_frechet_distance_rejects_different_dimensions():
    a = evaluator.FIDStatistics(np.zeros(3), np.eye(3))
    b = evaluator.FIDStatistics(np.zeros(4), np.eye(4))
    with pytest.raises(AssertionError, match="different lengths"):
        a.frechet_distance(b)


# ---------------------------------------------------------------------------------------------------------------
# Inception Score


def test_inception_score_matches_numpy_softmax_of_pool_times_logit_weight(tiny_evaluator, tiny_graph):
    pool = np.abs(np.random.RandomState(4).randn(23, 2048)).astype(np.float32) * 2
    for split in (5000, 7):  # one split; then splits of 7, 7, 7 and 2
        ours = tiny_evaluator.compute_inception_score(pool, split_size=split)
        assert ours == pytest.approx(_numpy_inception_score(pool, tiny_graph[1], split), rel=1e-5)


def test_inception_score_of_identical_predictions_is_one(tiny_evaluator):
    pool = np.tile(np.random.RandomState(5).rand(1, 2048).astype(np.float32), (600, 1))  # > softmax batch 512
    assert tiny_evaluator.compute_inception_score(pool) == pytest.approx(1.0, abs=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# precision / recall


def test_precision_and_recall_of_a_set_against_itself_are_one(distance_session):
    feats = np.random.RandomState(6).randn(30, 64).astype(np.float32)
    est = evaluator.ManifoldEstimator(distance_session)
    radii = est.manifold_radii(feats)
    precision, recall = est.evaluate_pr(feats, radii, feats, radii)
    assert precision[0] == 1.0 and recall[0] == 1.0


def test_precision_recall_and_radii_match_brute_force_on_exact_features(distance_session):
    # Small integer features: every distance is exact in float16, so the reference's fp16 path must agree exactly
    # with float64 brute force, including the OR over row/column blocks.
    rng = np.random.RandomState(7)
    ref = rng.randint(-3, 4, size=(37, 8)).astype(np.float32)
    sample = (rng.randint(-3, 4, size=(29, 8)) + np.array([1, 0, 0, 0, 0, 0, 0, 2])).astype(np.float32)
    precision, recall, r_ref, r_sample = _numpy_prec_recall(ref, sample)
    assert 0 < precision < 1 and 0 < recall < 1  # the case is not trivial
    for rows, cols in ((10000, 10000), (7, 5)):
        est = evaluator.ManifoldEstimator(distance_session, row_batch_size=rows, col_batch_size=cols)
        radii_ref = est.manifold_radii(ref)
        radii_sample = est.manifold_radii(sample)
        assert radii_ref.dtype == np.float32 and radii_ref.shape == (37, 1)
        np.testing.assert_array_equal(radii_ref[:, 0], r_ref)
        np.testing.assert_array_equal(radii_sample[:, 0], r_sample)
        pr = est.evaluate_pr(ref, radii_ref, sample, radii_sample)
        assert (pr[0][0], pr[1][0]) == (precision, recall)


def test_distance_block_uses_float16_and_falls_back_to_float32_on_overflow(distance_session):
    block = evaluator.DistanceBlock(distance_session)
    rng = np.random.RandomState(8)
    u, v = rng.rand(5, 64).astype(np.float32), rng.rand(6, 64).astype(np.float32)
    d = block.pairwise_distances(u, v)
    # fp16 first: every distance is a float16 value.
    np.testing.assert_array_equal(d, d.astype(np.float16).astype(np.float32))
    np.testing.assert_allclose(d, _sq_dists(u, v), rtol=2e-2, atol=0.05)
    # Squared norms above 65504 overflow float16: the block is recomputed in float32.
    big_u, big_v = u * 100, v * 100
    d = block.pairwise_distances(big_u, big_v)
    assert np.isfinite(d).all()
    np.testing.assert_allclose(d, _sq_dists(big_u, big_v), rtol=1e-3)


def test_compute_prec_recall_returns_python_floats(tiny_evaluator):
    rng = np.random.RandomState(9)
    # Sparse 0/1 features: distances are small integers, exact in float16.
    ref = (rng.rand(12, 2048) < 0.1).astype(np.float32)
    sample = (rng.rand(10, 2048) < 0.1).astype(np.float32)
    prec, recall = tiny_evaluator.compute_prec_recall(ref, sample)
    assert type(prec) is float and type(recall) is float
    assert (prec, recall) == _numpy_prec_recall(ref, sample)[:2]


# ---------------------------------------------------------------------------------------------------------------
# .npz reading


def test_open_npz_array_streams_arr_0_in_batches(tmp_path):
    images = np.random.RandomState(10).randint(0, 256, (10, 4, 5, 3)).astype(np.uint8)
    for save in (np.savez, np.savez_compressed):
        path = str(tmp_path / f"{save.__name__}.npz")
        save(path, images, np.arange(10))
        with evaluator.open_npz_array(path, "arr_0") as reader:
            assert isinstance(reader, evaluator.StreamingNpzArrayReader)
            batches = reader.read_batches(3)
            assert len(batches) == 4
            got = list(batches)
        assert [len(b) for b in got] == [3, 3, 3, 1]
        np.testing.assert_array_equal(np.concatenate(got), images)


def test_open_npz_array_loads_fortran_order_arrays_into_memory(tmp_path):
    images = np.asfortranarray(np.random.RandomState(11).randint(0, 256, (5, 4, 4, 3)).astype(np.uint8))
    path = str(tmp_path / "f.npz")
    np.savez(path, images)
    with evaluator.open_npz_array(path, "arr_0") as reader:
        assert isinstance(reader, evaluator.MemoryNpzArrayReader)
        np.testing.assert_array_equal(np.concatenate(list(reader.read_batches(2))), images)


def test_read_statistics_uses_precomputed_statistics_when_present(tmp_path):
    rng = np.random.RandomState(12)
    stats = {k: rng.rand(*shape) for k, shape in (("mu", (4,)), ("sigma", (4, 4)), ("mu_s", (3,)), ("sigma_s", (3, 3)))}
    path = str(tmp_path / "ref.npz")
    np.savez(path, np.zeros((2, 2, 2, 3), np.uint8), **stats)
    acts = (rng.rand(6, 4), rng.rand(6, 3))
    pool, spatial = evaluator.Evaluator.read_statistics(evaluator.Evaluator.__new__(evaluator.Evaluator), path, acts)
    np.testing.assert_array_equal(pool.mu, stats["mu"])
    np.testing.assert_array_equal(pool.sigma, stats["sigma"])
    np.testing.assert_array_equal(spatial.mu, stats["mu_s"])
    np.testing.assert_array_equal(spatial.sigma, stats["sigma_s"])
    # Without "mu": computed from the activations.
    plain = str(tmp_path / "plain.npz")
    np.savez(plain, np.zeros((2, 2, 2, 3), np.uint8))
    pool, spatial = evaluator.Evaluator.read_statistics(evaluator.Evaluator.__new__(evaluator.Evaluator), plain, acts)
    np.testing.assert_allclose(pool.sigma, np.cov(acts[0], rowvar=False))
    np.testing.assert_allclose(spatial.mu, acts[1].mean(0))


def test_describe_npz_rejects_bad_batches_with_a_fix(tmp_path):
    with pytest.raises(evaluator.NpzFormatError, match="no such file"):
        evaluator.describe_npz(str(tmp_path / "absent.npz"))
    nchw = str(tmp_path / "nchw.npz")
    np.savez(nchw, np.zeros((2, 3, 8, 8), np.uint8))
    with pytest.raises(evaluator.NpzFormatError, match="transpose"):
        evaluator.describe_npz(nchw)
    no_arr0 = str(tmp_path / "noarr0.npz")
    np.savez(no_arr0, images=np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(evaluator.NpzFormatError, match="no arr_0.*images"):
        evaluator.describe_npz(no_arr0)
    truncated = str(tmp_path / "truncated.npz")
    with open(truncated, "wb") as f:
        f.write(b"PK\x03\x04 not really a zip")
    with pytest.raises(evaluator.NpzFormatError, match="download it again"):
        evaluator.describe_npz(truncated)
    partial_stats = str(tmp_path / "partial.npz")
    np.savez(partial_stats, np.zeros((2, 8, 8, 3), np.uint8), mu=np.zeros(3))
    with pytest.raises(evaluator.NpzFormatError, match="sigma, mu_s, sigma_s"):
        evaluator.describe_npz(partial_stats)
    good = str(tmp_path / "good.npz")
    np.savez(good, np.zeros((5, 8, 6, 3), np.uint8))
    info = evaluator.describe_npz(good)
    assert (info.num_images, info.image_size(), info.has_statistics) == (5, "8x6x3", False)


# ---------------------------------------------------------------------------------------------------------------
# the Inception graph file


def test_inception_path_comes_from_flag_then_environment_then_working_directory(monkeypatch):
    monkeypatch.delenv(evaluator.INCEPTION_PATH_ENV, raising=False)
    assert evaluator.resolve_inception_path(None) == "classify_image_graph_def.pb"
    monkeypatch.setenv(evaluator.INCEPTION_PATH_ENV, "/models/inception.pb")
    assert evaluator.resolve_inception_path(None) == "/models/inception.pb"
    assert evaluator.resolve_inception_path("/flag/inception.pb") == "/flag/inception.pb"


def test_offline_download_exits_with_an_error_naming_the_url_and_the_place(tmp_path, monkeypatch, capsys):
    url = _offline_env(monkeypatch)
    batch = str(tmp_path / "batch.npz")
    np.savez(batch, np.zeros((4, 8, 8, 3), np.uint8))
    target = str(tmp_path / "models" / "classify_image_graph_def.pb")
    with pytest.raises(SystemExit) as exc:
        evaluator.run_cli(lambda: evaluator.main([batch, batch, "--inception_path", target]))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: could not download the Inception graph from " + url)
    assert evaluator.INCEPTION_V3_URL in err and os.path.abspath(target) in err and "--inception_path" in err
    assert "Traceback" not in err
    assert not os.path.exists(os.path.dirname(target))  # nothing left behind


def test_both_missing_batches_are_named_in_one_error_before_any_download(tmp_path, monkeypatch, capsys):
    _offline_env(monkeypatch)
    with pytest.raises(SystemExit) as exc:
        evaluator.run_cli(lambda: evaluator.main([str(tmp_path / "ref.npz"), str(tmp_path / "sample.npz")]))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: 2 problems") and "ref.npz" in err and "sample.npz" in err
    assert "download" not in err


def test_a_file_that_is_not_the_inception_graph_is_reported(tmp_path):
    bogus = str(tmp_path / "bogus.pb")
    graph = tf.Graph()
    with graph.as_default():
        tf.constant(1.0, name="something_else")
    with open(bogus, "wb") as f:
        f.write(graph.as_graph_def().SerializeToString())
    with pytest.raises(evaluator.EvaluatorError, match="not the Inception graph"):
        evaluator.Evaluator(tf.Session(graph=tf.Graph()), inception_path=bogus)


# ---------------------------------------------------------------------------------------------------------------
# end to end


def test_evaluator_command_prints_reference_scores_on_tiny_graph(tiny_graph, tmp_path, monkeypatch):
    """`python evaluations/evaluator.py ref.npz sample.npz` on the tiny graph, checked against numpy."""
    graph_path, w = tiny_graph
    rng = np.random.RandomState(13)
    dataset = _images(rng, 40, 12)  # the "whole dataset" the reference statistics describe
    ref_images = dataset[:14]  # arr_0 holds part of it, as the released batches
    sample_images = _images(rng, 26, 12)
    data_pool, data_spatial = _raw_activations(graph_path, dataset)
    ref_pool, _ = _raw_activations(graph_path, ref_images)
    sample_pool, sample_spatial = _raw_activations(graph_path, sample_images)
    ref = str(tmp_path / "ref.npz")
    np.savez(
        ref,
        ref_images,
        mu=data_pool.mean(0),
        sigma=np.cov(data_pool, rowvar=False),
        mu_s=data_spatial.mean(0),
        sigma_s=np.cov(data_spatial, rowvar=False),
    )
    sample = str(tmp_path / "sample.npz")
    np.savez(sample, sample_images, rng.randint(0, 1000, 26))

    env = dict(os.environ)
    env[evaluator.INCEPTION_URL_ENV] = _closed_local_url()  # nothing may be downloaded
    env.pop(evaluator.INCEPTION_PATH_ENV, None)
    proc = subprocess.run(
        [sys.executable, EVALUATOR_SCRIPT, ref, sample, "--inception_path", graph_path],
        cwd=str(tmp_path),
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    names = ["Inception Score", "FID", "sFID", "Precision", "Recall"]
    score_lines = [line for line in lines if line.split(":")[0] in names]
    assert [line.split(":")[0] for line in score_lines] == names
    scores = {line.split(":")[0]: float(line.split(": ")[1]) for line in score_lines}
    read_line = [line for line in lines if line.startswith("read: ")]
    assert len(read_line) == 1 and lines.index(read_line[0]) < lines.index(score_lines[0])
    assert re.search(r"ref\.npz: 14 images of 12x12x3 uint8 \(precomputed statistics\)", read_line[0])
    assert re.search(r"sample\.npz: 26 images of 12x12x3 uint8 \(statistics from its images\)", read_line[0])
    assert "warming up TensorFlow..." in lines and lines[-6] == "Computing evaluations..."

    assert scores["Inception Score"] == pytest.approx(_numpy_inception_score(sample_pool, w, 5000), rel=1e-4)
    # FID and sFID: samples' statistics against the precomputed ones of the whole dataset.
    assert scores["FID"] == pytest.approx(_nuclear_fid(sample_pool, data_pool), rel=1e-3)
    assert scores["sFID"] == pytest.approx(_nuclear_fid(sample_spatial, data_spatial), rel=1e-3)
    # Precision/recall: the reference compares float16 distances, so a comparison within float16 rounding of its
    # radius may go either way; the result must lie between the certain and the possible counts.
    _, _, r_ref, r_sample = _numpy_prec_recall(ref_pool, sample_pool)
    d = _sq_dists(ref_pool, sample_pool)
    slack = 4e-3 * ((ref_pool.astype(np.float64) ** 2).sum(1)[:, None] + (sample_pool.astype(np.float64) ** 2).sum(1))
    prec_lo = (d + slack <= r_ref[:, None]).any(0).mean()
    prec_hi = (d - slack <= r_ref[:, None]).any(0).mean()
    rec_lo = (d + slack <= r_sample[None, :]).any(1).mean()
    rec_hi = (d - slack <= r_sample[None, :]).any(1).mean()
    assert prec_lo <= scores["Precision"] <= prec_hi and rec_lo <= scores["Recall"] <= rec_hi
    assert prec_hi - prec_lo <= 0.25 and rec_hi - rec_lo <= 0.25  # the bounds say something
