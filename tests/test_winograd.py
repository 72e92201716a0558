"""Winograd F(2x2, 3x3) convolution: values and gradients equal the direct convolution's, and it is taken only where
it is meant to be."""

import numpy as np
import pytest
import jittor as jt
from jittor import nn as jnn

from guided_diffusion import nn as gnn
from guided_diffusion.cpu import winograd


def _direct(x, conv):
    return jnn.Conv2d.execute(conv, x)


@pytest.mark.parametrize(
    "shape, out_channels, bias",
    [((2, 5, 9, 11), 7, True), ((1, 3, 1, 1), 4, True), ((3, 16, 8, 6), 8, False), ((2, 32, 13, 2), 24, True)],
)
def test_winograd_conv_equals_direct_conv_for_odd_and_even_sizes(shape, out_channels, bias):
    rng = np.random.RandomState(0)
    x = jt.array(rng.randn(*shape).astype(np.float32) + 0.5)
    conv = jnn.Conv2d(shape[1], out_channels, 3, padding=1, bias=bias)
    with jt.no_grad():
        ours = winograd.winograd_conv3x3(x, conv.weight, conv.bias).numpy()
        ref = _direct(x, conv).numpy()
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5 * max(1.0, float(np.abs(ref).max())))


def test_winograd_conv_processes_tiles_in_chunks_without_seams(monkeypatch):
    monkeypatch.setattr(winograd, "TILES_PER_CHUNK", 12)  # 3 tile rows of 4 tiles per chunk, 2 images
    rng = np.random.RandomState(1)
    x = jt.array(rng.randn(2, 6, 14, 8).astype(np.float32))
    conv = jnn.Conv2d(6, 5, 3, padding=1)
    with jt.no_grad():
        ours = winograd.winograd_conv3x3(x, conv.weight, conv.bias).numpy()
        ref = _direct(x, conv).numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)


def _count_winograd_calls(monkeypatch):
    calls = []
    real = winograd.winograd_conv3x3

    def spy(*args, **kwargs):
        calls.append((args[0].shape, kwargs.get("transposed", False)))
        return real(*args, **kwargs)

    monkeypatch.setattr(winograd, "winograd_conv3x3", spy)
    return calls


def test_conv2d_takes_the_winograd_path_only_for_large_inference_convolutions(monkeypatch):
    calls = _count_winograd_calls(monkeypatch)
    rng = np.random.RandomState(2)
    c = winograd.MIN_CHANNELS
    conv = gnn.conv_nd(2, c, c, 3, padding=1)
    big = jt.array(rng.randn(1, c, 32, 32).astype(np.float32))  # 256 tiles
    small = jt.array(rng.randn(1, c, 8, 8).astype(np.float32))  # 16 tiles
    strided = gnn.conv_nd(2, c, c, 3, stride=2, padding=1)
    narrow = gnn.conv_nd(2, c, c // 2, 3, padding=1)
    with jt.no_grad():
        y = conv(big)
        conv(small)
        strided(big)
        narrow(big)
    assert calls == [([1, c, 32, 32], False)]
    np.testing.assert_allclose(y.numpy(), _direct(big, conv).numpy(), rtol=1e-5, atol=1e-5)


def _conv_and_grads(conv_fn, x_np, w_np, b_np, g_np):
    x, w, b = jt.array(x_np), jt.array(w_np), jt.array(b_np)
    y = conv_fn(x, w, b)
    grads = jt.grad((y * jt.array(g_np)).sum(), [x, w, b])
    return [y.numpy()] + [v.numpy() for v in grads]


@pytest.mark.parametrize("shape, out_channels", [((2, 5, 6, 8), 7), ((1, 6, 9, 5), 4), ((3, 8, 2, 2), 8)])
def test_winograd_training_conv_values_and_gradients_equal_the_direct_convolution(shape, out_channels):
    rng = np.random.RandomState(4)
    x = rng.randn(*shape).astype(np.float32)
    w = rng.randn(out_channels, shape[1], 3, 3).astype(np.float32)
    b = rng.randn(out_channels).astype(np.float32)
    g = rng.randn(shape[0], out_channels, shape[2], shape[3]).astype(np.float32)
    ours = _conv_and_grads(winograd.winograd_conv3x3_with_grad, x, w, b, g)
    ref = _conv_and_grads(lambda x, w, b: jnn.conv2d(x, w, b, 1, 1), x, w, b, g)
    for a, r in zip(ours, ref):
        assert np.abs(r).max() > 0
        np.testing.assert_allclose(a, r, rtol=1e-5, atol=1e-5 * float(np.abs(r).max()))


@pytest.mark.parametrize("chunk", [winograd.TILES_PER_CHUNK, 3])
@pytest.mark.parametrize("shape, out_channels", [((2, 5, 6, 8), 7), ((1, 3, 2, 2), 20), ((3, 17, 10, 4), 33)])
def test_winograd_weight_gradient_equals_onednn_backward_weights(monkeypatch, chunk, shape, out_channels):
    # A 2x2 map has one tile row, so with two threads one of them has no tiles; chunk=3 splits every thread's
    # rows over several accumulating GEMM rounds.
    monkeypatch.setattr(winograd, "TILES_PER_CHUNK", chunk)
    rng = np.random.RandomState(5)
    x = jt.array(rng.randn(*shape).astype(np.float32))
    dy = jt.array(rng.randn(shape[0], out_channels, shape[2], shape[3]).astype(np.float32))
    ours = winograd.winograd_grad_weight(x, dy).numpy()
    ref = jt.mkl_ops.mkl_conv_backward_w(x, dy, 3, 3, 1, 1, 1, 1, 1, 1, 1).numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5 * float(np.abs(ref).max()))


def test_transposed_winograd_conv_is_the_input_gradient_of_the_convolution():
    rng = np.random.RandomState(6)
    w = rng.randn(7, 5, 3, 3).astype(np.float32)
    dy = rng.randn(2, 7, 9, 6).astype(np.float32)
    ours = winograd.winograd_conv3x3(jt.array(dy), jt.array(w), transposed=True).numpy()
    ref = jnn.conv2d(jt.array(dy), jt.array(w[:, :, ::-1, ::-1].transpose(1, 0, 2, 3).copy()), None, 1, 1).numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5 * float(np.abs(ref).max()))


def test_conv2d_with_gradients_takes_the_winograd_path_for_large_convolutions(monkeypatch):
    calls = _count_winograd_calls(monkeypatch)
    rng = np.random.RandomState(3)
    c = winograd.MIN_CHANNELS
    conv = gnn.conv_nd(2, c, c, 3, padding=1)
    x_np = rng.randn(1, c, 32, 32).astype(np.float32)
    x = jt.array(x_np)
    y = conv(x)
    gx, gw, gb = jt.grad((y * y).sum(), [x, conv.weight, conv.bias])
    assert calls == [([1, c, 32, 32], False), ([1, c, 32, 32], True)]  # forward, then the input gradient
    xr = jt.array(x_np)
    yr = _direct(xr, conv)
    for ours, ref in zip([y, gx, gw, gb], [yr] + list(jt.grad((yr * yr).sum(), [xr, conv.weight, conv.bias]))):
        ref = ref.numpy()
        np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-5, atol=1e-5 * float(np.abs(ref).max()))


def test_conv2d_with_frozen_weights_computes_only_the_input_gradient(monkeypatch):
    weight_grads = []
    real = winograd.winograd_grad_weight
    monkeypatch.setattr(winograd, "winograd_grad_weight", lambda *a: weight_grads.append(1) or real(*a))
    c = winograd.MIN_CHANNELS
    conv = gnn.conv_nd(2, c, c, 3, padding=1)
    x = jt.array(np.random.RandomState(7).randn(4, c, 32, 32).astype(np.float32))  # 1024 tiles
    conv.weight.stop_grad()
    conv.bias.stop_grad()
    gx = jt.grad((conv(x) ** 2).sum(), x)
    assert np.abs(gx.numpy()).max() > 0
    assert weight_grads == []
    conv.weight.start_grad()
    gw = jt.grad((conv(x) ** 2).sum(), conv.weight)
    assert weight_grads == [1] and np.abs(gw.numpy()).max() > 0


def test_conv2d_keeps_jittor_conv2d_parameters_and_state_dict_keys():
    conv = gnn.conv_nd(2, 3, 5, 3, padding=1)
    assert isinstance(conv, jnn.Conv2d)
    assert sorted(conv.state_dict().keys()) == ["bias", "weight"]

