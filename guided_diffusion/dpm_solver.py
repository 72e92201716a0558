"""
DPM-Solver++ multistep sampling (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
Probabilistic Models", arXiv:2211.01095) for a (respaced) GaussianDiffusion.

The solver integrates the diffusion ODE in its data-prediction form. With alpha_t = sqrt(alpha_bar_t),
sigma_t = sqrt(1 - alpha_bar_t) and the half log-SNR lambda_t = log(alpha_t / sigma_t), one step from s to t
(h = lambda_t - lambda_s) of order 1 is

    x_t = (sigma_t / sigma_s) * x_s + alpha_t * (1 - exp(-h)) * D(x_s, s),

which is DDIM with eta = 0; orders 2 and 3 add finite differences of the data predictions D of the previous steps.
The walk visits every timestep of the diffusion from the last to 0 and ends with a step to the clean image
(sigma = 0). Step orders follow diffusers' DPMSolverMultistepScheduler(algorithm_type="dpmsolver++",
lower_order_final=True, final_sigmas_type="zero"): lower orders while the history fills, and lower orders at the
end (see solver_orders). The weights of each step are computed in float64 numpy and enter the graph as runtime Vars,
so a walk compiles one graph per order.
"""

from typing import Callable, Dict, List, Optional

import jittor as jt
import numpy as np

from .runtime_values import weighted_sum

# diffusers lowers the second-to-last step's order only for walks shorter than this (lower_order_final=True).
LOWER_ORDER_FINAL_STEPS = 15


def solver_orders(num_steps: int, solver_order: int) -> List[int]:
    """The order of each of the num_steps steps of a walk, by diffusers' rules for final_sigmas_type="zero".

    Step i has order min(solver_order, i + 1) (only i earlier data predictions exist); the last step (to sigma = 0)
    has order 1; the second-to-last has at most order 2 when the walk has fewer than 15 steps.
    """
    if solver_order not in (1, 2, 3):
        raise ValueError("DPM-Solver++ order must be 1, 2 or 3 (got %r)" % (solver_order,))
    orders = [min(solver_order, i + 1) for i in range(num_steps)]
    if num_steps >= 2 and num_steps < LOWER_ORDER_FINAL_STEPS:
        orders[-2] = min(orders[-2], 2)
    if num_steps >= 1:
        orders[-1] = 1
    return orders


def multistep_weights(alphas_cumprod_walk: np.ndarray, step: int, order: int) -> np.ndarray:
    """Weights [w_x, w_0, ..., w_{order-1}] of one step: x_t = w_x * x_s0 + sum_j w_j * D_j (float64).

    alphas_cumprod_walk holds alpha_bar of the points of the walk in the order they are visited, ending with 1.0
    (the clean image); the step goes from point `step` (s0) to point `step + 1` (t), and D_j is the data
    prediction made at point `step - j` (s_j).
    """
    walk = np.asarray(alphas_cumprod_walk, dtype=np.float64)
    if not 1 <= order <= step + 1:
        raise ValueError("step %d of a walk can have order 1 to %d (got %d)" % (step, step + 1, order))
    alpha = np.sqrt(walk)
    sigma = np.sqrt(1.0 - walk)
    with np.errstate(divide="ignore"):
        lam = np.log(alpha) - np.log(sigma)  # +inf at the clean image
    alpha_t, sigma_t = alpha[step + 1], sigma[step + 1]
    if sigma_t == 0.0 and order > 1:
        raise ValueError("the step to the clean image (sigma = 0) has order 1")
    h = lam[step + 1] - lam[step]
    phi_1 = -np.expm1(-h)  # 1 - exp(-h); exactly 1 at the clean image
    w_x = sigma_t / sigma[step]

    # The data-prediction terms as weight vectors over [D_0, D_1, D_2] (the newest first).
    e = np.eye(3)
    if order == 1:
        terms = alpha_t * phi_1 * e[0]
    elif order == 2:
        r0 = (lam[step] - lam[step - 1]) / h
        D1 = (e[0] - e[1]) / r0
        terms = alpha_t * phi_1 * (e[0] + 0.5 * D1)  # the midpoint form (diffusers' solver_type="midpoint")
    else:
        r0 = (lam[step] - lam[step - 1]) / h
        r1 = (lam[step - 1] - lam[step - 2]) / h
        D1_0 = (e[0] - e[1]) / r0
        D1_1 = (e[1] - e[2]) / r1
        D1 = D1_0 + r0 / (r0 + r1) * (D1_0 - D1_1)
        # As in the references, D2 approximates h^2 D''/2 while its weight below is the Taylor weight of h^2 D'':
        # the step is exact for data predictions linear in lambda, not quadratic ones, and 3M converges with order 2.
        D2 = (D1_0 - D1_1) / (r0 + r1)
        terms = alpha_t * (phi_1 * e[0] + (1.0 - phi_1 / h) * D1 - ((h - phi_1) / h**2 - 0.5) * D2)
    return np.concatenate([[w_x], terms[:order]])


def data_prediction(
    diffusion,
    model,
    x: jt.Var,
    t: jt.Var,
    clip_denoised: bool = True,
    denoised_fn: Optional[Callable] = None,
    cond_fn: Optional[Callable] = None,
    model_kwargs: Optional[dict] = None,
) -> jt.Var:
    """The model's x_0 prediction as DDIM uses it: denoised_fn, clipping, then cond_fn through the score."""
    out = diffusion.p_mean_variance(
        model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs
    )
    if cond_fn is not None:
        out = diffusion.condition_score(cond_fn, out, x, t, model_kwargs=model_kwargs)
    return out["pred_xstart"]


class DPMSolverStep:
    """One DPM-Solver++ walk over a diffusion's timesteps, called like a sampler step (model, x, t, **kwargs).

    It is called once per timestep, from the last to 0, as GaussianDiffusion._sample_steps does, and keeps the
    data predictions of the previous steps.
    """

    def __init__(self, diffusion, order: int = 2):
        self.diffusion = diffusion
        self.order = order
        self.orders = solver_orders(diffusion.num_timesteps, order)
        self.alphas_cumprod_walk = np.append(diffusion.alphas_cumprod[::-1], 1.0)
        self.history: List[jt.Var] = []  # data predictions, the newest first
        self.step = 0

    def __call__(
        self, model, x: jt.Var, t: jt.Var, clip_denoised=True, denoised_fn=None, cond_fn=None, model_kwargs=None
    ) -> Dict[str, jt.Var]:
        """Take the walk's next step from x at timestep t: {"sample", "pred_xstart"}."""
        if self.step >= len(self.orders):
            raise RuntimeError("this DPM-Solver++ walk has already reached the clean image")
        pred_xstart = data_prediction(
            self.diffusion, model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn, cond_fn=cond_fn,
            model_kwargs=model_kwargs,
        )
        self.history = [pred_xstart] + self.history[: self.order - 1]
        order = self.orders[self.step]
        sample = weighted_sum(multistep_weights(self.alphas_cumprod_walk, self.step, order), [x] + self.history[:order])
        self.step += 1
        return {"sample": sample, "pred_xstart": pred_xstart}
