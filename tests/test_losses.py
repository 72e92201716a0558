"""Tests for guided_diffusion.losses: Gaussian KL and the discretized Gaussian image likelihood."""

import math

import guided_diffusion  # noqa: F401  (prepares Jittor's environment before jittor is imported)
import jittor as jt
import numpy as np
import pytest

from guided_diffusion.losses import approx_standard_normal_cdf, discretized_gaussian_log_likelihood, normal_kl


def _np_cdf(x):
    return 0.5 * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def _np_dgll(x, means, log_scales):
    """The reference formula, in float64 numpy."""
    centered = x - means
    inv = np.exp(-log_scales)
    cdf_plus = _np_cdf(inv * (centered + 1 / 255))
    cdf_min = _np_cdf(inv * (centered - 1 / 255))
    log_cdf_plus = np.log(np.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = np.log(np.maximum(1 - cdf_min, 1e-12))
    log_delta = np.log(np.maximum(cdf_plus - cdf_min, 1e-12))
    return np.where(x < -0.999, log_cdf_plus, np.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def test_normal_kl_matches_closed_form():
    rng = np.random.RandomState(0)
    m1, lv1, m2, lv2 = [rng.randn(2, 3, 4, 4).astype(np.float32) for _ in range(4)]
    ours = normal_kl(jt.array(m1), jt.array(lv1), jt.array(m2), jt.array(lv2)).numpy()
    ref = 0.5 * (-1.0 + lv2 - lv1 + np.exp(lv1 - lv2) + (m1 - m2) ** 2 * np.exp(-lv2))
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)


def test_normal_kl_accepts_python_floats_for_the_standard_normal():
    mean = np.array([[0.5, -1.0]], dtype=np.float32)
    logvar = np.array([[0.2, -0.3]], dtype=np.float32)
    ours = normal_kl(jt.array(mean), jt.array(logvar), 0.0, 0.0).numpy()
    ref = 0.5 * (-1.0 - logvar + np.exp(logvar) + mean**2)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)


def test_normal_kl_requires_a_var():
    with pytest.raises(AssertionError):
        normal_kl(0.0, 0.0, 1.0, 0.0)


def test_approx_standard_normal_cdf_is_the_tanh_formula_and_saturates():
    x = np.array([-30.0, -5.0, -1.0, 0.0, 0.3, 2.0, 8.0, 30.0], dtype=np.float32)
    ours = approx_standard_normal_cdf(jt.array(x)).numpy()
    np.testing.assert_allclose(ours, _np_cdf(x.astype(np.float64)), atol=1e-6)
    assert ours[0] == 0.0 and ours[-1] == 1.0
    assert abs(ours[3] - 0.5) < 1e-7


def test_discretized_gaussian_log_likelihood_matches_reference_formula_in_every_branch():
    rng = np.random.RandomState(1)
    x = rng.choice([-1.0, 1.0, 0.0, 0.5, -0.3, 123 / 127.5 - 1], size=(2, 3, 6, 6)).astype(np.float32)
    # Means near the data and moderate scales: the float32 difference cdf_plus - cdf_min stays well conditioned.
    means = (x + rng.uniform(-0.3, 0.3, size=x.shape)).astype(np.float32)
    log_scales = rng.uniform(-3, 0.0, size=x.shape).astype(np.float32)
    ours = discretized_gaussian_log_likelihood(
        jt.array(x), means=jt.array(means), log_scales=jt.array(log_scales)
    ).numpy()
    # The reference runs in float32 too (1 - cdf and cdf differences cancel in float32), so compare with float32.
    ref = _np_dgll(x, means, log_scales)
    assert ref.dtype == np.float32
    assert (x < -0.999).any() and (x > 0.999).any() and (np.abs(x) < 0.999).any()
    np.testing.assert_allclose(ours, ref, rtol=1e-3, atol=1e-4)
    assert (ours <= 0).all()


def test_discretized_gaussian_log_likelihood_asserts_equal_shapes():
    with pytest.raises(AssertionError):
        discretized_gaussian_log_likelihood(
            jt.zeros((2, 3)), means=jt.zeros((2, 3)), log_scales=jt.zeros((2, 1))
        )


def test_discretized_gaussian_log_likelihood_gradient_has_no_nan_from_unselected_branches():
    # Far-off means and tiny scales drive the tanh in the unselected branches into the range where Jittor's
    # tanh gradient is NaN; jt.ternary must not let that through.
    rng = np.random.RandomState(0)
    x = rng.choice([-1.0, 1.0, 0.0, 0.5], size=(2, 3, 8, 8)).astype(np.float32)
    means = jt.array(rng.uniform(-3, 3, size=x.shape).astype(np.float32))
    log_scales = jt.array(rng.uniform(-30, 3, size=x.shape).astype(np.float32))
    ll = discretized_gaussian_log_likelihood(jt.array(x), means=means, log_scales=log_scales)
    g_means, g_scales = jt.grad(ll.sum(), [means, log_scales])
    assert np.isfinite(ll.numpy()).all()
    assert np.isfinite(g_means.numpy()).all()
    assert np.isfinite(g_scales.numpy()).all()


def test_discretized_gaussian_log_likelihood_gradient_matches_finite_differences():
    x = np.array([[-1.0, 0.2, 1.0, 0.6]], dtype=np.float32)
    means = np.array([[-0.9, 0.25, 0.95, 0.5]], dtype=np.float64)
    log_scales = np.full_like(means, math.log(0.05))
    m = jt.array(means.astype(np.float32))
    ll = discretized_gaussian_log_likelihood(jt.array(x), means=m, log_scales=jt.array(log_scales.astype(np.float32)))
    g = jt.grad(ll.sum(), m).numpy()
    eps = 1e-5
    fd = (
        _np_dgll(x.astype(np.float64), means + eps, log_scales) - _np_dgll(x.astype(np.float64), means - eps, log_scales)
    ) / (2 * eps)
    np.testing.assert_allclose(g, fd, rtol=2e-3, atol=2e-3)
