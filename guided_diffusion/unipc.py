"""
UniPC multistep sampling (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of
Diffusion Models", arXiv:2302.04867) in its data-prediction form, for a (respaced) GaussianDiffusion.

With alpha_t = sqrt(alpha_bar_t), sigma_t = sqrt(1 - alpha_bar_t), lambda_t = log(alpha_t / sigma_t) and
h = lambda_t - lambda_s, the predictor UniP-p goes from s to t with the p newest data predictions D,

    x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) D_0 - alpha_t B(h) sum_k rho_k (D_k - D_0) / r_k,

(r_k = (lambda_{s_k} - lambda_s) / h), which for p = 1 is DDIM. The corrector UniC-p runs after the model has been
called at the predicted point: it recomputes that point from the same start x_s, adding the new data prediction as
one more difference, so the walk reaches order p + 1 at no extra model call. B(h) is h (variant "bh1") or
e^h - 1 ("bh2"), with h taken as -h in the data-prediction form. Step orders, the corrector and the coefficients
rho follow diffusers' UniPCMultistepScheduler(predict_x0=True, lower_order_final=True, final_sigmas_type="zero"):
the predictor of step i has order min(order, i + 1, N - i), the corrector of step i the order of step i - 1's
predictor, and the last step (to sigma = 0) is the order-1 predictor, computed here without diffusers' B(h) * 0
term (B(h) = h is -inf there for bh1, which makes diffusers' last bh1 sample NaN). The weights are computed in
float64 numpy and enter the graph as runtime Vars, so a walk compiles one graph per order.
"""

from typing import Dict, List, Tuple

import jittor as jt
import numpy as np

from .dpm_solver import data_prediction
from .runtime_values import weighted_sum

#: The two choices of B(h) (the paper's B1(h) = h and B2(h) = e^h - 1; diffusers' default bh2).
UNIPC_VARIANTS = ("bh1", "bh2")
#: The orders of UniP (the corrector adds one).
UNIPC_ORDERS = (1, 2, 3)


def check_unipc_options(order: int, variant: str) -> None:
    """Raise ValueError for an order outside 1-3 or a variant other than bh1 / bh2."""
    if order not in UNIPC_ORDERS:
        raise ValueError("UniPC order must be 1, 2 or 3 (got %r)" % (order,))
    if variant not in UNIPC_VARIANTS:
        raise ValueError("UniPC variant must be bh1 or bh2 (got %r)" % (variant,))


def unipc_orders(num_steps: int, order: int) -> List[int]:
    """The predictor order of each step of a walk of num_steps steps: min(order, i + 1, num_steps - i)."""
    check_unipc_options(order, "bh2")
    return [min(order, i + 1, num_steps - i) for i in range(num_steps)]


def _log_snr(alphas_cumprod_walk: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    walk = np.asarray(alphas_cumprod_walk, dtype=np.float64)
    alpha, sigma = np.sqrt(walk), np.sqrt(1.0 - walk)
    with np.errstate(divide="ignore"):
        lam = np.log(alpha) - np.log(sigma)  # +inf at the clean image
    return alpha, sigma, lam


def _phi_terms(h: float, order: int, variant: str) -> Tuple[float, float, np.ndarray]:
    """(e^{-h} - 1, B(h), b) for a step of length h: b_i = i! * h phi_{i+1}(h) / B(h), i = 1..order (float64)."""
    hh = -h
    h_phi_1 = np.expm1(hh)
    b_h = hh if variant == "bh1" else np.expm1(hh)
    b = np.zeros(order)
    h_phi_k = h_phi_1 / hh - 1.0
    factorial = 1.0
    for i in range(order):
        b[i] = h_phi_k * factorial / b_h
        factorial *= i + 2
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    return h_phi_1, b_h, b


def _difference_system(lam: np.ndarray, s0: int, h: float, count: int) -> np.ndarray:
    """r_k = (lambda at point s0 - k - lambda at s0) / h for k = 1..count: the spacings of the older predictions."""
    return np.array([(lam[s0 - k] - lam[s0]) / h for k in range(1, count + 1)])


def predictor_weights(alphas_cumprod_walk: np.ndarray, step: int, order: int, variant: str = "bh2") -> np.ndarray:
    """Weights [w_x, w_0, ..., w_{order-1}] of UniP: x_t = w_x * x_s + sum_j w_j * D_j (float64).

    alphas_cumprod_walk holds alpha_bar of the walk's points in the order they are visited, ending with 1.0 (the
    clean image); the step goes from point `step` (s) to point `step + 1` (t), and D_j is the data prediction made at
    point `step - j`.
    """
    check_unipc_options(order, variant)
    if order > step + 1:
        raise ValueError("step %d of a walk can have order 1 to %d (got %d)" % (step, step + 1, order))
    alpha, sigma, lam = _log_snr(alphas_cumprod_walk)
    if sigma[step + 1] == 0.0 and order > 1:
        raise ValueError("the step to the clean image (sigma = 0) has order 1")
    h = lam[step + 1] - lam[step]
    h_phi_1, b_h, b = _phi_terms(h, order, variant)
    alpha_t = alpha[step + 1]
    weights = np.zeros(order + 1)
    weights[0] = sigma[step + 1] / sigma[step]
    weights[1] = -alpha_t * h_phi_1
    if order >= 2:
        r = _difference_system(lam, step, h, order - 1)
        if order == 2:
            rhos = np.array([0.5])  # diffusers' (and the paper's code's) simplified UniP-2
        else:
            rks = np.append(r, 1.0)
            R = np.stack([rks ** i for i in range(order)])
            rhos = np.linalg.solve(R[:-1, :-1], b[:-1])
        # - alpha_t B(h) sum_k rho_k (D_k - D_0) / r_k, spread over D_0 and D_k
        coef = alpha_t * b_h * rhos / r
        weights[1] += coef.sum()
        weights[2:] = -coef
    return weights


def corrector_weights(alphas_cumprod_walk: np.ndarray, step: int, order: int, variant: str = "bh2") -> np.ndarray:
    """Weights [w_x, w_new, w_0, ..., w_{order-1}] of UniC at point `step` (>= 1) (float64).

    The corrected point is x_t = w_x * x_s + w_new * D_t + sum_j w_j * D_j, where x_s is the (corrected) sample
    at point step - 1 the predictor started from, D_t the data prediction at the predicted point `step`, and D_j
    the one made at point step - 1 - j.
    """
    check_unipc_options(order, variant)
    if not 1 <= step or order > step:
        raise ValueError("the corrector at point %d can have order 1 to %d (got %d)" % (step, step, order))
    alpha, sigma, lam = _log_snr(alphas_cumprod_walk)
    if sigma[step] == 0.0:
        raise ValueError("the clean image (sigma = 0) is not corrected")
    s0 = step - 1
    h = lam[step] - lam[s0]
    h_phi_1, b_h, b = _phi_terms(h, order, variant)
    alpha_t = alpha[step]
    r = _difference_system(lam, s0, h, order - 1)
    if order == 1:
        rhos = np.array([0.5])
    else:
        rks = np.append(r, 1.0)
        R = np.stack([rks ** i for i in range(order)])
        rhos = np.linalg.solve(R, b)
    weights = np.zeros(order + 2)
    weights[0] = sigma[step] / sigma[s0]
    # - alpha_t B(h) (sum_k rho_k (D_k - D_0) / r_k + rho_last (D_t - D_0))
    weights[1] = -alpha_t * b_h * rhos[-1]
    coef = alpha_t * b_h * rhos[:-1] / r
    weights[2] = -alpha_t * h_phi_1 + coef.sum() + alpha_t * b_h * rhos[-1]
    weights[3:] = -coef
    return weights


class UniPCStep:
    """One UniPC walk over a diffusion's timesteps, called like a sampler step (model, x, t, **kwargs).

    It is called once per timestep, from the last to 0, as GaussianDiffusion._sample_steps does: it calls the model
    at the predicted point x, corrects that point (UniC, from the second step on), and predicts the next one (UniP)
    from the corrected point. It keeps the previous data predictions and the previous corrected point.
    """

    def __init__(self, diffusion, order: int = 2, variant: str = "bh2"):
        check_unipc_options(order, variant)
        self.diffusion = diffusion
        self.order = order
        self.variant = variant
        self.orders = unipc_orders(diffusion.num_timesteps, order)
        self.alphas_cumprod_walk = np.append(diffusion.alphas_cumprod[::-1], 1.0)
        self.history: List[jt.Var] = []  # data predictions, the newest first
        self.last_sample = None
        self.step = 0

    def __call__(
        self, model, x: jt.Var, t: jt.Var, clip_denoised=True, denoised_fn=None, cond_fn=None, model_kwargs=None
    ) -> Dict[str, jt.Var]:
        """Correct x (the point predicted by the previous step) and predict the next: {"sample", "pred_xstart"}."""
        if self.step >= len(self.orders):
            raise RuntimeError("this UniPC walk has already reached the clean image")
        pred_xstart = data_prediction(
            self.diffusion, model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn, cond_fn=cond_fn,
            model_kwargs=model_kwargs,
        )
        if self.step > 0:
            c_order = self.orders[self.step - 1]
            weights = corrector_weights(self.alphas_cumprod_walk, self.step, c_order, self.variant)
            x = weighted_sum(weights, [self.last_sample, pred_xstart] + self.history[:c_order])
        self.history = [pred_xstart] + self.history[: self.order - 1]
        self.last_sample = x
        order = self.orders[self.step]
        weights = predictor_weights(self.alphas_cumprod_walk, self.step, order, self.variant)
        sample = weighted_sum(weights, [x] + self.history[:order])
        self.step += 1
        return {"sample": sample, "pred_xstart": pred_xstart}
