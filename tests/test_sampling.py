"""Unit tests of guided_diffusion.sampling: the batch loop (labels, resume after an interruption, refusal to mix
runs, rank splitting), seeds, labels and the sampler choice."""

import json
import os
import threading

import numpy as np
import pytest

from guided_diffusion import dist_util, sampling
from guided_diffusion.errors import UserError


def _fake_batch(batch_index, n, shape=(4, 5, 3), labels=True):
    """Deterministic stand-in for a sampler: image values and labels derived from the batch index."""
    rng = np.random.RandomState(batch_index)
    images = rng.randint(0, 256, size=(n,) + shape).astype(np.uint8)
    return images, (rng.randint(0, 10, size=(n,)) if labels else None)


def _expected(num_samples, batch_size, **kw):
    images, labels = [], []
    for b in range(0, (num_samples + batch_size - 1) // batch_size):
        i, y = _fake_batch(b, batch_size, **kw)  # full batches; the surplus of the last one is dropped
        images.append(i)
        labels.append(y)
    images = np.concatenate(images)[:num_samples]
    return images, (np.concatenate(labels)[:num_samples] if labels[0] is not None else None)


def test_generate_samples_writes_npz_with_labels_and_grid(tmp_path):
    out = sampling.generate_samples(_fake_batch, num_samples=7, batch_size=3, out_dir=str(tmp_path),
                                    image_shape=(4, 5, 3))
    assert out == str(tmp_path / "samples_7x4x5x3.npz")
    images, labels = _expected(7, 3)
    with np.load(out) as data:
        np.testing.assert_array_equal(data["arr_0"], images)
        np.testing.assert_array_equal(data["arr_1"], labels)
        assert data["arr_1"].dtype == np.int64
    assert (tmp_path / "samples_7x4x5x3.png").exists()
    assert not (tmp_path / "samples_7.partial").exists()


def test_generate_samples_can_ask_for_a_short_last_batch(tmp_path):
    asked = []

    def batch(b, n):
        asked.append(n)
        return _fake_batch(b, n)

    sampling.generate_samples(batch, num_samples=5, batch_size=2, out_dir=str(tmp_path), pad_last_batch=False)
    assert asked == [2, 2, 1]


def test_generate_samples_without_labels_writes_only_arr_0(tmp_path):
    out = sampling.generate_samples(lambda b, n: _fake_batch(b, n, labels=False), num_samples=4, batch_size=4,
                                    out_dir=str(tmp_path))
    assert os.path.basename(out) == "samples_4x4x5x3.npz"
    with np.load(out) as data:
        assert data.files == ["arr_0"]


def test_generate_samples_resumes_after_interruption(tmp_path):
    calls = []

    def interrupted(b, n):
        if b == 2:
            raise KeyboardInterrupt
        calls.append(b)
        return _fake_batch(b, n)

    with pytest.raises(KeyboardInterrupt):
        sampling.generate_samples(interrupted, num_samples=10, batch_size=3, out_dir=str(tmp_path),
                                  image_shape=(4, 5, 3), run_config={"seed": 1})
    assert calls == [0, 1]
    assert not (tmp_path / "samples_10x4x5x3.npz").exists()  # no partial file presented as finished
    assert sorted(os.listdir(tmp_path / "samples_10.partial")) == ["batch_000000.npz", "batch_000001.npz",
                                                                   "meta.json"]

    def rest(b, n):
        calls.append(b)
        return _fake_batch(b, n)

    out = sampling.generate_samples(rest, num_samples=10, batch_size=3, out_dir=str(tmp_path),
                                    image_shape=(4, 5, 3), run_config={"seed": 1})
    assert calls == [0, 1, 2, 3]  # only the missing batches were sampled again
    images, labels = _expected(10, 3)
    with np.load(out) as data:
        np.testing.assert_array_equal(data["arr_0"], images)
        np.testing.assert_array_equal(data["arr_1"], labels)
    assert not (tmp_path / "samples_10.partial").exists()
    with open(tmp_path / "samples_10x4x5x3.json") as f:
        assert json.load(f)["run_config"] == {"seed": 1}


def test_generate_samples_refuses_to_resume_with_other_settings(tmp_path):
    def interrupted(b, n):
        if b == 1:
            raise KeyboardInterrupt
        return _fake_batch(b, n)

    with pytest.raises(KeyboardInterrupt):
        sampling.generate_samples(interrupted, num_samples=6, batch_size=3, out_dir=str(tmp_path),
                                  run_config={"seed": 1})
    with pytest.raises(UserError, match="seed 1 \\(now 2\\)"):
        sampling.generate_samples(_fake_batch, num_samples=6, batch_size=3, out_dir=str(tmp_path),
                                  run_config={"seed": 2})
    with pytest.raises(UserError, match="batch_size 3 \\(now 2\\)"):
        sampling.generate_samples(_fake_batch, num_samples=6, batch_size=2, out_dir=str(tmp_path),
                                  run_config={"seed": 1})


def test_generate_samples_finished_run_is_kept_not_redone(tmp_path):
    out = sampling.generate_samples(_fake_batch, num_samples=3, batch_size=3, out_dir=str(tmp_path),
                                    image_shape=(4, 5, 3), run_config={"a": 1})
    before = os.stat(out).st_mtime_ns

    def fail(b, n):
        raise AssertionError("nothing should be sampled again")

    again = sampling.generate_samples(fail, num_samples=3, batch_size=3, out_dir=str(tmp_path),
                                      image_shape=(4, 5, 3), run_config={"a": 1})
    assert again == out and os.stat(out).st_mtime_ns == before
    with pytest.raises(UserError, match="different settings"):
        sampling.generate_samples(fail, num_samples=3, batch_size=3, out_dir=str(tmp_path),
                                  image_shape=(4, 5, 3), run_config={"a": 2})


def test_generate_samples_splits_batches_across_ranks(tmp_path, monkeypatch):
    """Two simulated ranks (threads with a real all-gather exchange) produce the one-process file."""
    world = 2
    local = threading.local()
    slots = [None] * world
    barrier = threading.Barrier(world)
    computed = {0: [], 1: []}

    def all_gather(arr):
        slots[local.rank] = np.array(arr, copy=True)
        barrier.wait()
        out = list(slots)
        barrier.wait()
        return out

    monkeypatch.setattr(dist_util, "get_rank", lambda: local.rank)
    monkeypatch.setattr(dist_util, "get_world_size", lambda: world)
    monkeypatch.setattr(dist_util, "all_gather_array", all_gather)
    monkeypatch.setattr(dist_util, "barrier", lambda: barrier.wait())
    results, errors = {}, []

    def run(rank):
        local.rank = rank
        try:
            def batch(b, n):
                computed[rank].append(b)
                return _fake_batch(b, n)

            results[rank] = sampling.generate_samples(batch, num_samples=11, batch_size=2, out_dir=str(tmp_path))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert computed == {0: [0, 2, 4], 1: [1, 3, 5]}
    images, labels = _expected(11, 2)
    with np.load(results[0]) as data:
        np.testing.assert_array_equal(data["arr_0"], images)
        np.testing.assert_array_equal(data["arr_1"], labels)


def test_batch_labels_cycle_fixed_labels_by_global_index():
    rng = np.random.RandomState(0)
    np.testing.assert_array_equal(sampling.batch_labels(rng, 1, 4, 4, 10, [1, 2, 3]), [2, 3, 1, 2])
    random = sampling.batch_labels(rng, 0, 4, 4, 10)
    assert random.dtype == np.int64 and ((random >= 0) & (random < 10)).all()


def test_seed_batch_is_reproducible_and_differs_between_batches():
    import jittor as jt

    sampling.seed_batch(5, 3)
    a = jt.randn(4).numpy()
    sampling.seed_batch(5, 3)
    b = jt.randn(4).numpy()
    sampling.seed_batch(5, 4)
    c = jt.randn(4).numpy()
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_seed_batch_is_not_shifted_by_pending_lazy_random_ops():
    import jittor as jt

    sampling.seed_batch(5, 3)
    a = jt.randn(4).numpy()
    pending = jt.randn(9)  # e.g. a model's random initial weights, created but never evaluated
    sampling.seed_batch(5, 3)
    b = jt.randn(4).numpy()
    np.testing.assert_array_equal(a, b)
    del pending


def test_resolve_sampler_folds_use_ddim_in_and_refuses_contradictions():
    assert sampling.resolve_sampler("", False) == "ddpm"
    assert sampling.resolve_sampler("", True) == "ddim"
    assert sampling.resolve_sampler("ddim", True) == "ddim"
    assert sampling.resolve_sampler("DPM++2M", False) == "dpm++2m"
    with pytest.raises(UserError, match="give only one"):
        sampling.resolve_sampler("dpm++3m", True)
    with pytest.raises(UserError, match="unknown --sampler"):
        sampling.resolve_sampler("heun", False)
