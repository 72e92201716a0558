"""The exact noise prediction of Gaussian data: a test bed for the samplers (tests and bench/bench_samplers.py)."""

from typing import Optional

import guided_diffusion  # noqa: F401  (prepares Jittor's environment before jittor is imported)
import jittor as jt
import numpy as np

from guided_diffusion.gaussian_diffusion import _extract_into_tensor


class GaussianDataModel:
    """The exact noise prediction for data x_0 ~ N(mu, std^2 I) under a beta schedule: a test bed for solvers.

    With a = sqrt(alpha_bar_t), x_t = a x_0 + sqrt(1 - a^2) eps is Gaussian, and E[eps | x_t] is linear in x_t:
    eps(x_t, t) = sqrt(1 - a^2) * (x_t - a mu) / (a^2 std^2 + 1 - a^2). Called like a model with original-schedule
    timesteps; ode_solution is the exact map of the diffusion ODE between two timesteps.
    """

    def __init__(self, betas: np.ndarray, mu: float = 0.0, std: float = 1.0):
        self.alphas_cumprod = np.cumprod(1.0 - np.asarray(betas, dtype=np.float64))
        self.mu = float(mu)
        self.std = float(std)
        variance = self.alphas_cumprod * self.std**2 + 1.0 - self.alphas_cumprod
        self._eps_scale = np.sqrt(1.0 - self.alphas_cumprod) / variance
        self._eps_shift = np.sqrt(self.alphas_cumprod) * self.mu

    def __call__(self, x: jt.Var, t: jt.Var, **kwargs) -> jt.Var:
        """The exact noise prediction at original-schedule timesteps t."""
        shift = _extract_into_tensor(self._eps_shift, t, x.shape)
        return _extract_into_tensor(self._eps_scale, t, x.shape) * (x - shift)

    def _mean_variance(self, t: Optional[int]):
        alpha_bar = 1.0 if t is None else self.alphas_cumprod[t]
        return np.sqrt(alpha_bar) * self.mu, alpha_bar * self.std**2 + 1.0 - alpha_bar

    def ode_solution(self, x: np.ndarray, t_from: int, t_to: Optional[int] = None) -> np.ndarray:
        """The exact diffusion-ODE image at timestep t_to (None: the clean image) of x at timestep t_from (float64).

        The ODE of Gaussian data is affine in x, so it maps N(m_from, v_from) onto N(m_to, v_to) by standardising.
        """
        m_from, v_from = self._mean_variance(t_from)
        m_to, v_to = self._mean_variance(t_to)
        return m_to + np.sqrt(v_to / v_from) * (np.asarray(x, dtype=np.float64) - m_from)

    def data_prediction(self, x: np.ndarray, t: int) -> np.ndarray:
        """E[x_0 | x_t] in float64: the exact denoiser at timestep t."""
        alpha_bar = self.alphas_cumprod[t]
        m, v = self._mean_variance(t)
        return self.mu + np.sqrt(alpha_bar) * self.std**2 / v * (np.asarray(x, dtype=np.float64) - m)
