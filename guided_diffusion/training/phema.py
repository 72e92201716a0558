"""
The mathematics of the power-function EMA and of post-hoc EMA reconstruction (Karras et al. 2024, "Analyzing and
Improving the Training Dynamics of Diffusion Models", Eq. 121-127, 151 and Algorithms 2-3; NVlabs/edm2
training/phema.py), in float64 numpy.

A power-function EMA at training time t (here: optimizer steps) averages the weights of every earlier time tau with
the profile p(tau) = (exp + 1) tau^exp / t^(exp + 1) on [0, t]. Its width is given as the relative standard
deviation `std` of that profile (std / t), which fixes the exponent: std = sqrt((exp + 1) / ((exp + 2)^2 (exp + 3))).
std 0.05 to 0.10 are EDM2's usual values; std must lie in (0, MAX_STD] (exp >= 0 needs std <= 0.2887).
"""

from typing import Sequence, Union

import numpy as np

#: The widest relative standard deviation accepted (EDM2's tools use the same bound; exp stays positive).
MAX_STD = 0.28

ArrayLike = Union[float, Sequence[float], np.ndarray]


def exp_to_std(exp: ArrayLike) -> np.ndarray:
    """The relative standard deviation of the power-function profile with exponent `exp` (Eq. 123)."""
    exp = np.asarray(exp, dtype=np.float64)
    return np.sqrt((exp + 1) / ((exp + 2) ** 2 * (exp + 3)))


def std_to_exp(std: ArrayLike) -> np.ndarray:
    """The exponent whose profile has relative standard deviation `std` (Eq. 126, Algorithm 2): the largest real
    root of exp^3 + 7 exp^2 + (16 - std^-2) exp + (12 - std^-2) = 0."""
    std = np.asarray(std, dtype=np.float64)
    out = np.empty(std.shape, dtype=np.float64)
    for index, s in np.ndenumerate(std):
        inv_var = s ** -2
        roots = np.roots([1.0, 7.0, 16.0 - inv_var, 12.0 - inv_var])
        out[index] = roots.real[np.abs(roots.imag) < 1e-9 * max(1.0, np.abs(roots).max())].max()
    return out


def power_function_beta(std: float, step: int) -> float:
    """The decay of the power-function EMA at optimizer step `step` (1, 2, ...): (1 - 1/step)^(exp + 1) (Eq. 127);
    step 1 gives 0, so the average starts as the weights after the first update."""
    return float((1.0 - 1.0 / step) ** (float(std_to_exp(std)) + 1.0))


def power_function_correlation(a_time: ArrayLike, a_std: ArrayLike, b_time: ArrayLike, b_std: ArrayLike) -> np.ndarray:
    """The inner product of two power-function profiles, at times a_time and b_time with stds a_std and b_std
    (Eq. 151, Algorithm 3): (ea+1)(eb+1) (ta/tb)^(eb if ta < tb else -ea) / ((ea+eb+1) max(ta, tb)); broadcasts."""
    a_time, b_time = np.asarray(a_time, np.float64), np.asarray(b_time, np.float64)
    a_exp, b_exp = std_to_exp(a_std), std_to_exp(b_std)
    ratio_exp = np.where(a_time < b_time, b_exp, -a_exp)
    numerator = (a_exp + 1) * (b_exp + 1) * (a_time / b_time) ** ratio_exp
    return numerator / ((a_exp + b_exp + 1) * np.maximum(a_time, b_time))


def solve_posthoc_coefficients(in_times: ArrayLike, in_stds: ArrayLike, out_times: ArrayLike,
                               out_stds: ArrayLike) -> np.ndarray:
    """Least-squares weights [len(in), len(out)] that combine the stored averages (times in_times, stds in_stds) into
    the profiles (out_times, out_stds) (Algorithm 3); each column sums to 1."""
    in_times, in_stds = (np.asarray(v, np.float64).reshape(-1) for v in np.broadcast_arrays(in_times, in_stds))
    out_times, out_stds = (np.asarray(v, np.float64).reshape(-1) for v in np.broadcast_arrays(out_times, out_stds))
    gram = power_function_correlation(in_times[:, None], in_stds[:, None], in_times[None, :], in_stds[None, :])
    target = power_function_correlation(in_times[:, None], in_stds[:, None], out_times[None, :], out_stds[None, :])
    coefficients = np.linalg.solve(gram, target)
    return coefficients / coefficients.sum(axis=0, keepdims=True)
