"""Winograd F(2x2, 3x3) convolution: equal to the direct convolution, and taken only where it is meant to be."""

import numpy as np
import pytest
import jittor as jt
from jittor import nn as jnn

from guided_diffusion import nn as gnn
from guided_diffusion import winograd


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

    def spy(*args):
        calls.append(args[0].shape)
        return real(*args)

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
    assert calls == [[1, c, 32, 32]]
    np.testing.assert_allclose(y.numpy(), _direct(big, conv).numpy(), rtol=1e-5, atol=1e-5)


def test_conv2d_with_gradients_uses_the_direct_convolution_and_its_gradients(monkeypatch):
    calls = _count_winograd_calls(monkeypatch)
    rng = np.random.RandomState(3)
    c = winograd.MIN_CHANNELS
    conv = gnn.conv_nd(2, c, c, 3, padding=1)
    x = jt.array(rng.randn(1, c, 32, 32).astype(np.float32))
    y = conv(x)
    gx, gw = jt.grad((y * y).sum(), [x, conv.weight])
    assert calls == []
    assert np.abs(gx.numpy()).max() > 0 and np.abs(gw.numpy()).max() > 0


def test_conv2d_keeps_jittor_conv2d_parameters_and_state_dict_keys():
    conv = gnn.conv_nd(2, 3, 5, 3, padding=1)
    assert isinstance(conv, jnn.Conv2d)
    assert sorted(conv.state_dict().keys()) == ["bias", "weight"]

