"""Tests for guided_diffusion/nn.py: numerics of the building blocks shared by every model."""

import numpy as np
import pytest

import guided_diffusion  # noqa: F401  (prepares Jittor before it is imported)
import jittor as jt
from jittor import nn as jnn

from guided_diffusion.cpu import kernels as cpu_kernels
from guided_diffusion import nn as gnn


def _np_group_norm(x: np.ndarray, groups: int, weight: np.ndarray, bias: np.ndarray, eps: float = 1e-5):
    x = x.astype(np.float64)
    n, c = x.shape[:2]
    xg = x.reshape(n, groups, -1)
    mean = xg.mean(-1, keepdims=True)
    var = ((xg - mean) ** 2).mean(-1, keepdims=True)
    y = ((xg - mean) / np.sqrt(var + eps)).reshape(x.shape)
    bshape = (1, c) + (1,) * (x.ndim - 2)
    return y * weight.reshape(bshape) + bias.reshape(bshape)


def test_groupnorm32_is_accurate_for_inputs_with_large_mean():
    rng = np.random.RandomState(0)
    x = (100.0 + rng.randn(2, 64, 8, 8)).astype(np.float32)
    norm = gnn.normalization(64)
    w = rng.randn(64).astype(np.float32)
    b = rng.randn(64).astype(np.float32)
    norm.weight.assign(jt.array(w))
    norm.bias.assign(jt.array(b))
    ours = norm(jt.array(x)).numpy()
    ref = _np_group_norm(x, 32, w.astype(np.float64), b.astype(np.float64))
    err = np.abs(ours - ref).max()
    assert err < 1e-4, err
    # Jittor's one-pass GroupNorm is what this class exists to avoid; it is visibly worse here.
    builtin = jnn.GroupNorm(32, 64)
    builtin.weight.assign(jt.array(w))
    builtin.bias.assign(jt.array(b))
    assert np.abs(builtin(jt.array(x)).numpy() - ref).max() > 10 * err


def test_groupnorm32_defaults_and_2d_input():
    norm = gnn.normalization(64)
    assert isinstance(norm, gnn.GroupNorm32)
    assert norm.num_groups == 32 and norm.eps == 1e-5 and norm.affine
    assert sorted(norm.state_dict().keys()) == ["bias", "weight"]
    x = np.random.RandomState(1).randn(4, 64).astype(np.float32)
    ours = norm(jt.array(x)).numpy()
    ref = _np_group_norm(x, 32, np.ones(64), np.zeros(64))
    assert ours.shape == (4, 64)
    assert np.abs(ours - ref).max() < 1e-5


def _count_jt_code(monkeypatch) -> list:
    """Make every jt.code call append one entry to the returned list."""
    calls = []
    real = jt.code

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(jt, "code", counting)
    return calls


def _group_norm_case(shape, seed=0):
    rng = np.random.RandomState(seed)
    c = shape[1]
    x = (5.0 + 3.0 * rng.randn(*shape)).astype(np.float32)  # a non-zero mean
    w = (1.0 + rng.randn(c)).astype(np.float32)
    b = rng.randn(c).astype(np.float32)
    dy = rng.randn(*shape).astype(np.float32)  # a random upstream gradient
    return x, w, b, dy


def _rel_err(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(a - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("shape", [(2, 64, 8, 8), (2, 96, 50)])
def test_group_norm_fast_path_matches_op_by_op_values_and_gradients(monkeypatch, shape):
    x, w, b, dy = _group_norm_case(shape)
    calls = _count_jt_code(monkeypatch)
    norm = gnn.GroupNorm32(32, shape[1])
    norm.weight.assign(jt.array(w))
    norm.bias.assign(jt.array(b))
    xv = jt.array(x)
    y = norm(xv)
    assert len(calls) == 1  # the whole forward is one kernel
    grads = jt.grad((y * jt.array(dy)).sum(), [xv, norm.weight, norm.bias])
    assert len(calls) == 2  # and so is the whole backward (dx, dweight, dbias)
    fast = [y.numpy()] + [g.numpy() for g in grads]

    xr, wr, br = jt.array(x), jt.array(w), jt.array(b)
    yr = gnn._group_norm_ops(xr, wr, br, 32, 1e-5)
    ref = [yr.numpy()] + [g.numpy() for g in jt.grad((yr * jt.array(dy)).sum(), [xr, wr, br])]
    assert len(calls) == 2  # the op-by-op reference uses no kernel of its own

    np.testing.assert_allclose(fast[0], ref[0], atol=1e-5)
    np.testing.assert_allclose(fast[0], _np_group_norm(x, 32, w.astype(np.float64), b.astype(np.float64)),
                               atol=1e-5)
    for name, got, want in zip(("dx", "dweight", "dbias"), fast[1:], ref[1:]):
        assert got.shape == want.shape, name
        assert _rel_err(got, want) < 1e-4, (name, _rel_err(got, want))


def test_group_norm_fast_path_gradient_matches_float64_formula():
    x, w, b, dy = _group_norm_case((3, 64, 5, 7), seed=1)
    norm = _group_norm_with(w, b)
    xv = jt.array(x)
    dx, dw, db = (g.numpy() for g in jt.grad((norm(xv) * jt.array(dy)).sum(), [xv, norm.weight, norm.bias]))
    x64, w64, dy64 = x.astype(np.float64).reshape(3, 32, -1), w.astype(np.float64), dy.astype(np.float64)
    mean = x64.mean(-1, keepdims=True)
    rstd = 1.0 / np.sqrt(((x64 - mean) ** 2).mean(-1, keepdims=True) + 1e-5)
    xhat = ((x64 - mean) * rstd).reshape(x.shape)
    dyhat = (dy64 * w64.reshape(1, 64, 1, 1)).reshape(3, 32, -1)
    xh = xhat.reshape(3, 32, -1)
    dx_ref = rstd * (dyhat - dyhat.mean(-1, keepdims=True) - xh * (dyhat * xh).mean(-1, keepdims=True))
    assert _rel_err(dx, dx_ref.reshape(x.shape)) < 1e-4
    assert _rel_err(dw, (dy64 * xhat).sum((0, 2, 3))) < 1e-4
    assert _rel_err(db, dy64.sum((0, 2, 3))) < 1e-4


def _group_norm_with(w: np.ndarray, b: np.ndarray) -> gnn.GroupNorm32:
    norm = gnn.GroupNorm32(32, 64)
    norm.weight.assign(jt.array(w))
    norm.bias.assign(jt.array(b))
    return norm


def test_group_norm_fast_path_gradients_are_deterministic():
    x, w, b, dy = _group_norm_case((4, 64, 6, 6), seed=2)
    norm = _group_norm_with(w, b)
    runs = []
    for _ in range(3):
        xv = jt.array(x)
        y = norm(xv)
        runs.append([y.numpy()] + [g.numpy() for g in jt.grad((y * jt.array(dy)).sum(), [xv, norm.weight,
                                                                                          norm.bias])])
    for other in runs[1:]:
        for a, r in zip(runs[0], other):
            np.testing.assert_array_equal(a, r)


def test_group_norm_fast_path_with_frozen_parameters_and_no_upstream_gradient():
    x, w, b, dy = _group_norm_case((2, 64, 4, 4), seed=3)
    norm = _group_norm_with(w, b)
    norm.weight.stop_grad()
    norm.bias.stop_grad()
    xv = jt.array(x)
    dx = jt.grad((norm(xv) * jt.array(dy)).sum(), xv).numpy()
    xr = jt.array(x)
    yr = gnn._group_norm_ops(xr, jt.array(w), jt.array(b), 32, 1e-5)
    assert _rel_err(dx, jt.grad((yr * jt.array(dy)).sum(), xr).numpy()) < 1e-4
    fn = cpu_kernels._GroupNorm(32, 1e-5)
    fn(jt.array(x).reshape((2, 64, 16)), jt.array(w), jt.array(b))
    assert tuple(fn.grad(None)) == (None, None, None)


def test_group_norm_float16_input_is_normalised_in_float32_and_cast_back():
    x, w, b, dy = _group_norm_case((2, 64, 4, 4), seed=4)
    norm = _group_norm_with(w, b)
    xv = jt.array(x).float16()
    y = norm(xv)
    assert y.dtype == "float16" and norm.weight.dtype == "float32"
    dx, dw = jt.grad((y.float32() * jt.array(dy)).sum(), [xv, norm.weight])
    assert dx.dtype == "float16" and dw.dtype == "float32"
    x16 = x.astype(np.float16).astype(np.float32)
    np.testing.assert_allclose(y.numpy().astype(np.float32),
                               _np_group_norm(x16, 32, w.astype(np.float64), b.astype(np.float64)), atol=2e-2)
    assert np.isfinite(dx.numpy()).all() and np.abs(dw.numpy()).max() > 0


def test_group_norm_in_checkpoint_gives_the_same_values_and_gradients_with_either_flag():
    x, w, b, dy = _group_norm_case((2, 64, 4, 4), seed=5)
    norm = _group_norm_with(w, b)
    results = []
    for flag in (False, True):
        xv = jt.array(x)
        out = gnn.checkpoint(lambda v: norm(v) * 2.0, (xv,), norm.parameters(), flag)
        grads = jt.grad((out * jt.array(dy)).sum(), [xv, norm.weight, norm.bias])
        results.append([out.numpy()] + [g.numpy() for g in grads])
    for a, r in zip(*results):
        np.testing.assert_array_equal(a, r)


def test_timestep_embedding_matches_reference_values():
    emb = gnn.timestep_embedding(jt.array(np.array([1, 999], dtype=np.int64)), 256).numpy()
    assert emb.shape == (2, 256) and emb.dtype == np.float32
    np.testing.assert_allclose(emb[0, 0:3], [0.5403023, 0.5973753, 0.6479059], atol=1e-6)
    np.testing.assert_allclose(emb[0, 128:131], [0.8414710, 0.8019618, 0.7617204], atol=1e-6)
    np.testing.assert_allclose(emb[1, -1], 0.107147217, atol=1e-6)


def test_timestep_embedding_odd_dim_appends_a_zero_column():
    emb = gnn.timestep_embedding(jt.array(np.array([3, 50], dtype=np.int32)), 7).numpy()
    assert emb.shape == (2, 7)
    assert np.all(emb[:, -1] == 0)
    half = 3
    freqs = np.exp(-np.log(10000.0) * np.arange(half) / half)
    args = np.array([3.0, 50.0])[:, None] * freqs[None]
    np.testing.assert_allclose(emb[:, :6], np.concatenate([np.cos(args), np.sin(args)], -1), atol=1e-5)


@pytest.mark.parametrize("trans_a,trans_b", [(False, False), (True, False), (False, True), (True, True)])
def test_batched_matmul_forward_and_backward_match_numpy(trans_a, trans_b):
    rng = np.random.RandomState(2)
    n, m, k = 5, 4, 6
    a_np = rng.randn(3, *((m, n) if trans_a else (n, m))).astype(np.float32)
    b_np = rng.randn(3, *((k, m) if trans_b else (m, k))).astype(np.float32)
    g_np = rng.randn(3, n, k).astype(np.float32)
    a, b = jt.array(a_np), jt.array(b_np)
    out = gnn.batched_matmul(a, b, trans_a=trans_a, trans_b=trans_b)
    opa = a_np.transpose(0, 2, 1) if trans_a else a_np
    opb = b_np.transpose(0, 2, 1) if trans_b else b_np
    np.testing.assert_allclose(out.numpy(), opa @ opb, rtol=1e-5, atol=1e-5)
    da, db = jt.grad((out * jt.array(g_np)).sum(), [a, b])
    d_opa = g_np @ opb.transpose(0, 2, 1)
    d_opb = opa.transpose(0, 2, 1) @ g_np
    np.testing.assert_allclose(da.numpy(), d_opa.transpose(0, 2, 1) if trans_a else d_opa, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(db.numpy(), d_opb.transpose(0, 2, 1) if trans_b else d_opb, rtol=1e-5, atol=1e-5)


def test_attention_qkv_matches_numpy_softmax_attention():
    rng = np.random.RandomState(3)
    q, k, v = (rng.randn(4, 8, 10).astype(np.float32) for _ in range(3))
    scale = 1 / np.sqrt(np.sqrt(8))
    out = gnn.attention_qkv(jt.array(q), jt.array(k), jt.array(v), scale).numpy()
    w = np.einsum("bct,bcs->bts", q.astype(np.float64) * scale, k.astype(np.float64) * scale)
    w = np.exp(w - w.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    ref = np.einsum("bts,bcs->bct", w, v.astype(np.float64))
    np.testing.assert_allclose(out, ref, atol=1e-5)


def test_conv_nd_and_avg_pool_nd_cover_1d_2d_3d():
    assert tuple(gnn.conv_nd(1, 4, 12, 1).weight.shape) == (12, 4, 1)
    assert list(gnn.conv_nd(1, 4, 12, 1).state_dict().keys()) == ["weight", "bias"]
    assert tuple(gnn.conv_nd(2, 4, 8, 3, padding=1)(jt.randn(1, 4, 6, 6)).shape) == (1, 8, 6, 6)
    assert tuple(gnn.conv_nd(3, 4, 8, 3, padding=1)(jt.randn(1, 4, 2, 6, 6)).shape) == (1, 8, 2, 6, 6)
    with pytest.raises(ValueError):
        gnn.conv_nd(4, 1, 1, 1)
    with pytest.raises(ValueError):
        gnn.avg_pool_nd(4, kernel_size=2)
    x1 = np.arange(12, dtype=np.float32).reshape(1, 2, 6)
    np.testing.assert_allclose(gnn.avg_pool_nd(1, kernel_size=2, stride=2)(jt.array(x1)).numpy(),
                               x1.reshape(1, 2, 3, 2).mean(-1))
    x2 = np.random.RandomState(4).randn(1, 2, 4, 6).astype(np.float32)
    np.testing.assert_allclose(gnn.avg_pool_nd(2, kernel_size=2, stride=2)(jt.array(x2)).numpy(),
                               x2.reshape(1, 2, 2, 2, 3, 2).mean((3, 5)), atol=1e-6)
    x3 = np.random.RandomState(5).randn(1, 2, 3, 4, 4).astype(np.float32)
    pooled = gnn.avg_pool_nd(3, kernel_size=(1, 2, 2), stride=(1, 2, 2))(jt.array(x3)).numpy()
    np.testing.assert_allclose(pooled, x3.reshape(1, 2, 3, 2, 2, 2, 2).mean((4, 6)), atol=1e-6)


def test_zero_scale_update_ema_and_mean_flat():
    lin = gnn.zero_module(gnn.linear(3, 4))
    assert all(np.all(p.numpy() == 0) for p in lin.parameters())
    lin2 = gnn.linear(3, 4)
    before = [p.numpy().copy() for p in lin2.parameters()]
    gnn.scale_module(lin2, 0.5)
    for p, b in zip(lin2.parameters(), before):
        np.testing.assert_allclose(p.numpy(), 0.5 * b, rtol=1e-6)
    targ = [jt.array(np.ones(3, np.float32))]
    src = [jt.array(np.full(3, 3.0, np.float32))]
    gnn.update_ema(targ, src, rate=0.9)
    np.testing.assert_allclose(targ[0].numpy(), 0.9 + 0.3, rtol=1e-6)
    x = np.random.RandomState(6).randn(2, 3, 4).astype(np.float32)
    np.testing.assert_allclose(gnn.mean_flat(jt.array(x)).numpy(), x.mean((1, 2)), rtol=1e-5)


def test_checkpoint_gives_the_same_values_and_gradients_with_either_flag():
    lin = gnn.linear(4, 4)
    x = jt.array(np.random.RandomState(7).randn(2, 4).astype(np.float32))

    def f(v):
        return jt.sigmoid(lin(v)) * v

    results = []
    for flag in (False, True):
        out = gnn.checkpoint(f, (x,), lin.parameters(), flag)
        grads = jt.grad(out.sum(), [x, lin.weight, lin.bias])
        results.append([out.numpy()] + [g.numpy() for g in grads])
    # The recomputation may fuse the element-wise ops differently, so results agree to float32 rounding.
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_avg_pool_nd_accepts_inputs_as_small_as_the_window():
    x = np.random.RandomState(8).randn(2, 3, 2, 2).astype(np.float32)
    out = gnn.avg_pool_nd(2, kernel_size=2, stride=2)(jt.array(x)).numpy()
    np.testing.assert_allclose(out, x.mean((2, 3), keepdims=True), atol=1e-6)
    odd = np.random.RandomState(9).randn(1, 1, 5, 5).astype(np.float32)
    out = gnn.avg_pool_nd(2, kernel_size=2, stride=2)(jt.array(odd)).numpy()
    np.testing.assert_allclose(out, odd[:, :, :4, :4].reshape(1, 1, 2, 2, 2, 2).mean((3, 5)), atol=1e-6)


def test_group_norm_with_channels_not_divisible_by_groups_equals_the_plain_ops(monkeypatch):
    # normalization(16) has 32 groups over 16 channels (tiny test models): the fused kernel must not take it
    from guided_diffusion import cpu

    norm = gnn.GroupNorm32(32, 16)
    x = jt.array(np.random.RandomState(3).randn(2, 16, 4, 4).astype(np.float32))
    runs = []
    for plain in (False, True):
        if plain:
            monkeypatch.setattr(cpu, "fast_cpu_path", lambda *vs: False)
        out = norm(x)
        grads = jt.grad((out * out).sum(), [x, norm.weight])
        runs.append([out.numpy()] + [g.numpy() for g in grads])
    for a, b in zip(*runs):
        assert np.abs(b).max() > 0
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
