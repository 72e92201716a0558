"""
Helpers for the variational-bound terms: Gaussian KL divergence and the discretized Gaussian likelihood of images.

Numerics follow guided-diffusion's ``losses.py`` (which borrows them from the original DDPM code).
"""

import math
from typing import Union

import jittor as jt
import numpy as np

Number = Union[float, int, np.ndarray, jt.Var]


def _like(x: Number, ref: jt.Var) -> jt.Var:
    """Turn a Python/numpy value into a Var of ref's dtype (Vars pass through)."""
    if isinstance(x, jt.Var):
        return x
    return jt.array(np.asarray(x, dtype=np.float32)).cast(ref.dtype)


def normal_kl(mean1: Number, logvar1: Number, mean2: Number, logvar2: Number) -> jt.Var:
    """KL divergence between two diagonal Gaussians (in nats, elementwise, broadcasting); one input must be a Var."""
    tensor = None
    for obj in (mean1, logvar1, mean2, logvar2):
        if isinstance(obj, jt.Var):
            tensor = obj
            break
    assert tensor is not None, "at least one argument must be a Var"

    # Log variances given as Python/numpy values become Vars, so exp() below works on them.
    logvar1, logvar2 = [_like(x, tensor) for x in (logvar1, logvar2)]

    return 0.5 * (
        -1.0 + logvar2 - logvar1 + jt.exp(logvar1 - logvar2) + ((mean1 - mean2) ** 2) * jt.exp(-logvar2)
    )


def approx_standard_normal_cdf(x: jt.Var) -> jt.Var:
    """A fast tanh approximation of the standard normal CDF (the one the reference uses)."""
    # Both clamps leave every float32 value unchanged (the CDF is exactly 0 or 1 beyond |x| = 20 and tanh is
    # exactly +-1 beyond 20) but keep the gradient finite: Jittor 1.3.11's tanh gradient is NaN for inputs between
    # about 45 and 1e4, and x**3 overflows for huge x. Without them a NaN from the branch jt.ternary discards in
    # discretized_gaussian_log_likelihood would still poison the gradient.
    x = x.clamp(-20.0, 20.0)
    inner = math.sqrt(2.0 / math.pi) * (x + 0.044715 * jt.pow(x, 3))
    return 0.5 * (1.0 + jt.tanh(inner.clamp(-20.0, 20.0)))


def discretized_gaussian_log_likelihood(x: jt.Var, *, means: jt.Var, log_scales: jt.Var) -> jt.Var:
    """Log-likelihood (nats) of images in [-1, 1], quantised to 256 bins, under a Gaussian per pixel."""
    assert x.shape == means.shape == log_scales.shape
    centered_x = x - means
    inv_stdv = jt.exp(-log_scales)
    plus_in = inv_stdv * (centered_x + 1.0 / 255.0)
    cdf_plus = approx_standard_normal_cdf(plus_in)
    min_in = inv_stdv * (centered_x - 1.0 / 255.0)
    cdf_min = approx_standard_normal_cdf(min_in)
    # Every branch is clamped before the log, so the branch that jt.ternary does not select stays finite and its
    # (masked-out) gradient is 0 rather than NaN.
    log_cdf_plus = jt.log(cdf_plus.clamp(min_v=1e-12))
    log_one_minus_cdf_min = jt.log((1.0 - cdf_min).clamp(min_v=1e-12))
    cdf_delta = cdf_plus - cdf_min
    log_probs = jt.ternary(
        x < -0.999,
        log_cdf_plus,
        jt.ternary(x > 0.999, log_one_minus_cdf_min, jt.log(cdf_delta.clamp(min_v=1e-12))),
    )
    assert log_probs.shape == x.shape
    return log_probs
