"""The fused CPU kernels (guided_diffusion/cpu/kernels.py): values and gradients equal a float64 NumPy computation."""

import numpy as np
import pytest

import guided_diffusion  # noqa: F401  (prepares Jittor before it is imported)
import jittor as jt

from guided_diffusion import cpu
from guided_diffusion.cpu import kernels as cpu_kernels
from guided_diffusion import nn as gnn


def _grads(fn, arrays, upstream):
    vars_ = [jt.array(a) for a in arrays]
    out = fn(*vars_)
    return [out.numpy()] + [g.numpy() for g in jt.grad((out * jt.array(upstream)).sum(), vars_)]


def _close(ours, ref, rtol=1e-5):
    ref = np.asarray(ref)
    np.testing.assert_allclose(ours, ref, rtol=rtol, atol=rtol * max(1.0, float(np.abs(ref).max())))


@pytest.mark.parametrize("shape", [(3, 5, 4, 6), (2, 7, 9), (64, 128, 16, 16)])
def test_channel_bias_add_and_its_gradient_match_numpy(shape):
    rng = np.random.RandomState(0)
    x = rng.randn(*shape).astype(np.float32)
    b = rng.randn(shape[1]).astype(np.float32)
    g = rng.randn(*shape).astype(np.float32)
    y, dx, db = _grads(cpu_kernels.channel_bias_add, [x, b], g)
    bshape = (1, -1) + (1,) * (len(shape) - 2)
    _close(y, x + b.reshape(bshape))
    _close(dx, g)
    axes = tuple(i for i in range(len(shape)) if i != 1)
    _close(db, g.astype(np.float64).sum(axes))


@pytest.mark.parametrize("shape", [(3, 5, 4, 6), (8, 64, 32, 32)])
def test_scale_shift_and_its_gradients_match_numpy(shape):
    rng = np.random.RandomState(1)
    h = rng.randn(*shape).astype(np.float32)
    scale = rng.randn(shape[0], shape[1], 1, 1).astype(np.float32)
    shift = rng.randn(shape[0], shape[1], 1, 1).astype(np.float32)
    g = rng.randn(*shape).astype(np.float32)
    y, dh, dscale, dshift = _grads(cpu_kernels.scale_shift, [h, scale, shift], g)
    h64, g64 = h.astype(np.float64), g.astype(np.float64)
    _close(y, h64 * (1 + scale) + shift)
    _close(dh, g64 * (1 + scale))
    _close(dscale, (g64 * h64).sum((2, 3), keepdims=True))
    _close(dshift, g64.sum((2, 3), keepdims=True))


def test_silu_and_its_gradient_match_numpy():
    rng = np.random.RandomState(2)
    x = (rng.randn(4, 33, 70) * 6).astype(np.float32)
    g = rng.randn(*x.shape).astype(np.float32)
    y, dx = _grads(cpu_kernels.silu, [x], g)
    x64 = x.astype(np.float64)
    s = 1 / (1 + np.exp(-x64))
    _close(y, x64 * s)
    _close(dx, g * (s + x64 * s * (1 - s)))


def _np_qkv_attention(qkv, heads, legacy):
    n, width, length = qkv.shape
    ch = width // (3 * heads)
    qkv = qkv.astype(np.float64)
    if legacy:
        q, k, v = np.split(qkv.reshape(n * heads, 3 * ch, length), 3, axis=1)
    else:
        q, k, v = (part.reshape(n * heads, ch, length) for part in np.split(qkv, 3, axis=1))
    scale = 1 / np.sqrt(np.sqrt(ch))
    w = np.einsum("bct,bcs->bts", q * scale, k * scale)
    w = np.exp(w - w.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    return np.einsum("bts,bcs->bct", w, v).reshape(n, -1, length)


@pytest.mark.parametrize("legacy", [True, False])
@pytest.mark.parametrize("heads, ch, length", [(1, 4, 1), (3, 8, 7), (4, 16, 64)])
def test_qkv_attention_matches_numpy_with_and_without_gradients(legacy, heads, ch, length):
    rng = np.random.RandomState(3)
    qkv = rng.randn(2, 3 * heads * ch, length).astype(np.float32)
    scale = 1 / np.sqrt(np.sqrt(ch))
    ref = _np_qkv_attention(qkv, heads, legacy)
    with_grad = cpu_kernels.qkv_attention(jt.array(qkv), heads, legacy, scale, with_grad=True).numpy()
    without = cpu_kernels.qkv_attention(jt.array(qkv), heads, legacy, scale, with_grad=False).numpy()
    _close(with_grad, ref)
    np.testing.assert_array_equal(without, with_grad)


@pytest.mark.parametrize("legacy", [True, False])
def test_qkv_attention_gradient_matches_the_op_by_op_gradient(monkeypatch, legacy):
    rng = np.random.RandomState(4)
    heads, ch, length = 3, 8, 20
    qkv = rng.randn(2, 3 * heads * ch, length).astype(np.float32)
    g = rng.randn(2, heads * ch, length).astype(np.float32)
    fused = _grads(lambda x: gnn.qkv_attention(x, heads, legacy), [qkv], g)
    monkeypatch.setattr(cpu, "fast_cpu_path", lambda *vs: False)  # gnn.attention_qkv on sliced heads
    plain = _grads(lambda x: gnn.qkv_attention(x, heads, legacy), [qkv], g)
    for ours, ref in zip(fused, plain):
        assert np.abs(ref).max() > 0
        _close(ours, ref)


def test_sum_of_squares_covers_many_tensors_of_any_shape():
    rng = np.random.RandomState(5)
    shapes = [(3,), (4, 5), (7, 3, 3, 3), (1,), (1000,)] * 30  # 150 tensors: three chunks of kernels
    arrays = [rng.randn(*s).astype(np.float32) for s in shapes]
    ours = cpu_kernels.sum_of_squares([jt.array(a) for a in arrays]).numpy()
    assert ours.dtype == np.float64 and ours.shape == (len(arrays),)
    np.testing.assert_allclose(ours, [np.sum(a.astype(np.float64) ** 2) for a in arrays], rtol=1e-12)
    assert cpu_kernels.sum_of_squares([]).shape == (0,)


def test_fused_kernels_are_deterministic():
    rng = np.random.RandomState(6)
    qkv = rng.randn(4, 3 * 4 * 32, 256).astype(np.float32)
    g = rng.randn(4, 4 * 32, 256).astype(np.float32)
    first = _grads(lambda x: cpu_kernels.qkv_attention(x, 4, True, 0.42, with_grad=True), [qkv], g)
    second = _grads(lambda x: cpu_kernels.qkv_attention(x, 4, True, 0.42, with_grad=True), [qkv], g)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("mean", [0.0, 50.0])
def test_layer_norm_modulate_matches_numpy(mean):
    rng = np.random.RandomState(7)
    x = (mean + rng.randn(2, 9, 40)).astype(np.float32)
    shift, scale = rng.randn(2, 40).astype(np.float32), rng.randn(2, 40).astype(np.float32)
    ours = cpu_kernels.layer_norm_modulate(jt.array(x), jt.array(shift), jt.array(scale), 1e-6).numpy()
    x64 = x.astype(np.float64)
    xn = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + 1e-6)
    _close(ours, xn * (1 + scale[:, None]) + shift[:, None])


@pytest.mark.parametrize("shape", [(3, 20, 7, 5), (2, 20, 9), (1, 64, 4096)])
def test_pointwise_conv_matches_numpy(shape):
    rng = np.random.RandomState(8)
    x = rng.randn(*shape).astype(np.float32)
    w = rng.randn(11, shape[1]).astype(np.float32)
    b = rng.randn(11).astype(np.float32)
    w_shaped = w.reshape((11, shape[1]) + (1,) * (len(shape) - 2))
    ours = cpu_kernels.pointwise_conv(jt.array(x), jt.array(w_shaped), jt.array(b)).numpy()
    ref = np.einsum("oc,nc...->no...", w.astype(np.float64), x.astype(np.float64))
    _close(ours, ref + b.reshape((1, 11) + (1,) * (len(shape) - 2)))


@pytest.mark.parametrize("dims, shape", [(1, (2, 24, 9)), (2, (3, 24, 6, 5))])
def test_conv_nd_pointwise_inference_path_matches_gradient_path(monkeypatch, dims, shape):
    calls = []
    real = cpu_kernels.pointwise_conv
    monkeypatch.setattr(cpu_kernels, "pointwise_conv", lambda *a: calls.append(1) or real(*a))
    conv = gnn.conv_nd(dims, 24, 10, 1)
    x = jt.array(np.random.RandomState(9).randn(*shape).astype(np.float32))
    with jt.no_grad():
        fast = conv(x).numpy()
    slow = conv(x).numpy()
    assert calls == [1]
    _close(fast, slow)
