"""Tests for the CPU fast paths in guided_diffusion/nn.py (forward-only kernels used under jt.no_grad()):
each must give what the gradient-capable path gives, and stay numerically robust."""

import os
import sys

import numpy as np
import pytest

import guided_diffusion  # noqa: F401  (prepares Jittor before it is imported)
import jittor as jt

from guided_diffusion.cpu import kernels as cpu_kernels
from guided_diffusion import nn as gnn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _np_group_norm(x, groups, weight, bias, eps=1e-5):
    x = x.astype(np.float64)
    xg = x.reshape(x.shape[0], groups, -1)
    mean = xg.mean(-1, keepdims=True)
    var = ((xg - mean) ** 2).mean(-1, keepdims=True)
    y = ((xg - mean) / np.sqrt(var + eps)).reshape(x.shape)
    bshape = (1, x.shape[1]) + (1,) * (x.ndim - 2)
    return y * weight.reshape(bshape) + bias.reshape(bshape)


@pytest.mark.parametrize("mean", [0.0, 100.0])
@pytest.mark.parametrize("shape", [(2, 64, 8, 8), (3, 64, 10)])
def test_groupnorm32_inference_kernel_matches_float64_and_the_gradient_path(mean, shape):
    rng = np.random.RandomState(0)
    x = (mean + rng.randn(*shape)).astype(np.float32)
    w, b = rng.randn(64).astype(np.float32), rng.randn(64).astype(np.float32)
    norm = gnn.normalization(64)
    norm.weight.assign(jt.array(w))
    norm.bias.assign(jt.array(b))
    with jt.no_grad():
        fast = norm(jt.array(x)).numpy()
    slow = norm(jt.array(x)).numpy()
    ref = _np_group_norm(x, 32, w.astype(np.float64), b.astype(np.float64))
    assert np.abs(fast - ref).max() < 2e-5
    assert np.abs(fast - slow).max() < 1e-4


def test_softmax_last_matches_numpy_with_gradient():
    rng = np.random.RandomState(1)
    x = (rng.randn(3, 5, 17) * 4).astype(np.float32)
    g = rng.randn(*x.shape).astype(np.float32)
    xv = jt.array(x)
    y = gnn.softmax_last(xv)
    gx = jt.grad((y * jt.array(g)).sum(), xv).numpy()
    e = np.exp(x.astype(np.float64) - x.max(-1, keepdims=True))
    ref = e / e.sum(-1, keepdims=True)
    np.testing.assert_allclose(y.numpy(), ref, atol=1e-6)
    np.testing.assert_allclose(gx, ref * (g - (g * ref).sum(-1, keepdims=True)), atol=1e-6)


@pytest.mark.parametrize("legacy", [True, False])
def test_qkv_attention_inference_path_matches_gradient_path(legacy):
    rng = np.random.RandomState(2)
    qkv = rng.randn(2, 3 * 3 * 16, 40).astype(np.float32)
    with jt.no_grad():
        fast = gnn.qkv_attention(jt.array(qkv), 3, legacy).numpy()
    x = jt.array(qkv)
    slow = gnn.qkv_attention(x, 3, legacy)
    assert jt.grad(slow.sum(), x).numpy().any()
    assert np.abs(slow.numpy()).max() > 0
    np.testing.assert_allclose(fast, slow.numpy(), atol=1e-5)


def test_dit_attention_inference_path_matches_gradient_path():
    sys.path.insert(0, os.path.join(ROOT, "DiT"))
    import models

    rng = np.random.RandomState(3)
    q, k, v = (jt.array(rng.randn(8, 30, 12).astype(np.float32)) for _ in range(3))
    with jt.no_grad():
        fast = models.scaled_dot_product_attention(q, k, v, 12 ** -0.5).numpy()
    slow = models.scaled_dot_product_attention(q, k, v, 12 ** -0.5).numpy()
    assert np.abs(slow).max() > 0
    np.testing.assert_allclose(fast, slow, atol=1e-5)


def test_dit_norm_modulate_inference_path_matches_gradient_path():
    sys.path.insert(0, os.path.join(ROOT, "DiT"))
    import models

    rng = np.random.RandomState(4)
    x = jt.array((3 + rng.randn(2, 6, 24)).astype(np.float32))
    shift, scale = (jt.array(rng.randn(2, 24).astype(np.float32)) for _ in range(2))
    norm = models.LayerNormNoAffine(24, eps=1e-6)
    with jt.no_grad():
        fast = models.norm_modulate(norm, x, shift, scale).numpy()
    slow = models.norm_modulate(norm, x, shift, scale).numpy()
    assert np.abs(slow).max() > 0
    np.testing.assert_allclose(fast, slow, rtol=1e-5, atol=1e-5)


def test_attention_heads_matches_numpy_softmax_attention():
    rng = np.random.RandomState(5)
    q = rng.randn(6, 37, 8).astype(np.float32)
    k = rng.randn(6, 8, 29).astype(np.float32)
    v = rng.randn(6, 29, 8).astype(np.float32)
    with jt.no_grad():
        ours = cpu_kernels.attention_heads(jt.array(q), jt.array(k), jt.array(v)).numpy()
    w = np.einsum("btd,bds->bts", q.astype(np.float64), k.astype(np.float64))
    w = np.exp(w - w.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    ref = np.einsum("bts,bsd->btd", w, v.astype(np.float64))
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)
