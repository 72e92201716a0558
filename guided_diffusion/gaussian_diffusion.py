"""
Gaussian diffusion: noise schedules, the forward process, the learned reverse process (ancestral and DDIM sampling;
DPM-Solver++ in dpm_solver.py, UniPC in unipc.py), the variational bound and the training losses.

A Jittor port of guided-diffusion's ``gaussian_diffusion.py`` (itself based on Ho et al.'s DDPM code and the
Improved DDPM code). Schedules are float64 numpy arrays, gathered by timestep as float64 Vars and only then cast to
float32, as the reference does. Per-step values are Vars (never Python floats) so a sampling loop compiles its
kernels once, in the first step.
"""

import enum
import math
import weakref
from typing import Any, Callable, Dict, Iterator, Optional, Sequence

import jittor as jt
import numpy as np

from .errors import UserError
from .losses import discretized_gaussian_log_likelihood, normal_kl
from .dpm_solver import DPMSolverStep
from .nn import mean_flat
from .runtime_values import runtime_var
from .unipc import UniPCStep


class ScheduleError(UserError, NotImplementedError):
    """An unknown noise schedule name was requested."""


def get_named_beta_schedule(schedule_name: str, num_diffusion_timesteps: int) -> np.ndarray:
    """Return the float64 beta schedule called schedule_name ("linear", "cosine" or DiT's "squaredcos_cap_v2")."""
    if schedule_name == "linear":
        # Linear schedule from Ho et al, extended to work for any number of diffusion steps.
        scale = 1000 / num_diffusion_timesteps
        beta_start = scale * 0.0001
        beta_end = scale * 0.02
        return np.linspace(beta_start, beta_end, num_diffusion_timesteps, dtype=np.float64)
    elif schedule_name in ("cosine", "squaredcos_cap_v2"):
        return betas_for_alpha_bar(
            num_diffusion_timesteps,
            lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2,
        )
    else:
        raise ScheduleError(
            f"unknown beta schedule: {schedule_name} (--noise_schedule); use linear or cosine"
        )


def betas_for_alpha_bar(
    num_diffusion_timesteps: int, alpha_bar: Callable[[float], float], max_beta: float = 0.999
) -> np.ndarray:
    """Discretise a cumulative product of (1-beta) given as a function of t in [0, 1] into float64 betas."""
    betas = []
    for i in range(num_diffusion_timesteps):
        t1 = i / num_diffusion_timesteps
        t2 = (i + 1) / num_diffusion_timesteps
        betas.append(min(1 - alpha_bar(t2) / alpha_bar(t1), max_beta))
    return np.array(betas)


class ModelMeanType(enum.Enum):
    """Which type of output the model predicts."""

    PREVIOUS_X = enum.auto()  # the model predicts x_{t-1}
    START_X = enum.auto()  # the model predicts x_0
    EPSILON = enum.auto()  # the model predicts epsilon


class ModelVarType(enum.Enum):
    """What is used as the model's output variance (LEARNED_RANGE interpolates between the two fixed ones)."""

    LEARNED = enum.auto()
    FIXED_SMALL = enum.auto()
    FIXED_LARGE = enum.auto()
    LEARNED_RANGE = enum.auto()


class LossType(enum.Enum):
    """Which training objective is optimised."""

    MSE = enum.auto()  # use raw MSE loss (and KL when learning variances)
    RESCALED_MSE = enum.auto()  # use raw MSE loss (with RESCALED_KL when learning variances)
    KL = enum.auto()  # use the variational lower-bound
    RESCALED_KL = enum.auto()  # like KL, but rescale to estimate the full VLB

    def is_vb(self) -> bool:
        """True for the variational-bound losses."""
        return self == LossType.KL or self == LossType.RESCALED_KL


def _as_int_timesteps(t: Any) -> jt.Var:
    """Timesteps as an int32 Var (numpy arrays and lists are accepted for convenience)."""
    if isinstance(t, jt.Var):
        return t
    return _timestep_var(np.asarray(t, dtype=np.int32))


def _timestep_var(values: np.ndarray) -> jt.Var:
    """An int32 Var holding values (timesteps), never folded into a kernel as a constant."""
    return runtime_var(values, np.int32)


class GaussianDiffusion:
    """Utilities for training and sampling diffusion models (same API as guided-diffusion).

    :param betas: a 1-D numpy array of betas for each diffusion timestep, starting at T and going to 1.
    :param model_mean_type: a ModelMeanType determining what the model outputs.
    :param model_var_type: a ModelVarType determining how variance is output.
    :param loss_type: a LossType determining the loss function to use.
    :param rescale_timesteps: if True, pass floating point timesteps into the model so that they are always scaled
        like in the original paper (0 to 1000).
    """

    def __init__(self, *, betas, model_mean_type, model_var_type, loss_type, rescale_timesteps=False):
        self.model_mean_type = model_mean_type
        self.model_var_type = model_var_type
        self.loss_type = loss_type
        self.rescale_timesteps = rescale_timesteps

        # Use float64 for accuracy.
        betas = np.array(betas, dtype=np.float64)
        self.betas = betas
        assert len(betas.shape) == 1, "betas must be 1-D"
        assert (betas > 0).all() and (betas <= 1).all()

        self.num_timesteps = int(betas.shape[0])

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas, axis=0)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)
        assert self.alphas_cumprod_prev.shape == (self.num_timesteps,)

        # calculations for diffusion q(x_t | x_{t-1}) and others
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)

        # calculations for posterior q(x_{t-1} | x_t, x_0)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # log calculation clipped because the posterior variance is 0 at the beginning of the diffusion chain.
        self.posterior_log_variance_clipped = np.log(
            np.append(self.posterior_variance[1], self.posterior_variance[1:])
        )
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (
            (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        )

        # Used by FIXED_LARGE (precomputed once instead of per call; same values as the reference).
        self._fixed_large_variance = np.append(self.posterior_variance[1], self.betas[1:])
        self._fixed_large_log_variance = np.log(self._fixed_large_variance)
        self._log_betas = np.log(self.betas)
        self._one_minus_alphas_cumprod = 1.0 - self.alphas_cumprod
        self._recip_posterior_mean_coef1 = 1.0 / self.posterior_mean_coef1
        self._posterior_mean_coef2_over_coef1 = self.posterior_mean_coef2 / self.posterior_mean_coef1

    # ------------------------------------------------------------------ forward process

    def q_mean_variance(self, x_start: jt.Var, t: jt.Var):
        """Get the distribution q(x_t | x_0): (mean, variance, log_variance)."""
        t = _as_int_timesteps(t)
        mean = _extract_into_tensor(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
        variance = _extract_into_tensor(self._one_minus_alphas_cumprod, t, x_start.shape)
        log_variance = _extract_into_tensor(self.log_one_minus_alphas_cumprod, t, x_start.shape)
        return mean, variance, log_variance

    def q_sample(self, x_start: jt.Var, t: jt.Var, noise: Optional[jt.Var] = None) -> jt.Var:
        """Diffuse the data for a given number of diffusion steps, i.e. sample from q(x_t | x_0)."""
        t = _as_int_timesteps(t)
        if noise is None:
            noise = jt.randn_like(x_start)
        assert list(noise.shape) == list(x_start.shape)
        return (
            _extract_into_tensor(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
            + _extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise
        )

    def q_posterior_mean_variance(self, x_start: jt.Var, x_t: jt.Var, t: jt.Var):
        """Mean and variance of the diffusion posterior q(x_{t-1} | x_t, x_0)."""
        t = _as_int_timesteps(t)
        assert list(x_start.shape) == list(x_t.shape)
        posterior_mean = (
            _extract_into_tensor(self.posterior_mean_coef1, t, x_t.shape) * x_start
            + _extract_into_tensor(self.posterior_mean_coef2, t, x_t.shape) * x_t
        )
        posterior_variance = _extract_into_tensor(self.posterior_variance, t, x_t.shape)
        posterior_log_variance_clipped = _extract_into_tensor(self.posterior_log_variance_clipped, t, x_t.shape)
        assert (
            posterior_mean.shape[0]
            == posterior_variance.shape[0]
            == posterior_log_variance_clipped.shape[0]
            == x_start.shape[0]
        )
        return posterior_mean, posterior_variance, posterior_log_variance_clipped

    # ------------------------------------------------------------------ reverse process

    def p_mean_variance(
        self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None
    ) -> Dict[str, jt.Var]:
        """Apply the model to get p(x_{t-1} | x_t) and a prediction of x_0.

        Returns a dict with "mean", "variance", "log_variance" and "pred_xstart".
        """
        if model_kwargs is None:
            model_kwargs = {}
        t = _as_int_timesteps(t)

        B, C = x.shape[:2]
        assert list(t.shape) == [B]
        model_output = model(x, self._scale_timesteps(t), **model_kwargs)

        if self.model_var_type in [ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE]:
            assert list(model_output.shape) == [B, C * 2] + list(x.shape[2:])
            model_output, model_var_values = model_output[:, :C], model_output[:, C:]
            if self.model_var_type == ModelVarType.LEARNED:
                model_log_variance = model_var_values
                model_variance = jt.exp(model_log_variance)
            else:
                min_log = _extract_into_tensor(self.posterior_log_variance_clipped, t, x.shape)
                max_log = _extract_into_tensor(self._log_betas, t, x.shape)
                # The model_var_values is [-1, 1] for [min_var, max_var].
                frac = (model_var_values + 1) / 2
                model_log_variance = frac * max_log + (1 - frac) * min_log
                model_variance = jt.exp(model_log_variance)
        else:
            if self.model_var_type == ModelVarType.FIXED_LARGE:
                # for fixedlarge, we set the initial (log-)variance like so to get a better decoder log likelihood.
                var_arr, log_var_arr = self._fixed_large_variance, self._fixed_large_log_variance
            elif self.model_var_type == ModelVarType.FIXED_SMALL:
                var_arr, log_var_arr = self.posterior_variance, self.posterior_log_variance_clipped
            else:
                raise NotImplementedError(self.model_var_type)
            model_variance = _extract_into_tensor(var_arr, t, x.shape)
            model_log_variance = _extract_into_tensor(log_var_arr, t, x.shape)

        def process_xstart(v):
            if denoised_fn is not None:
                v = denoised_fn(v)
            if clip_denoised:
                return v.clamp(-1, 1)
            return v

        if self.model_mean_type == ModelMeanType.PREVIOUS_X:
            pred_xstart = process_xstart(self._predict_xstart_from_xprev(x_t=x, t=t, xprev=model_output))
            model_mean = model_output
        elif self.model_mean_type in [ModelMeanType.START_X, ModelMeanType.EPSILON]:
            if self.model_mean_type == ModelMeanType.START_X:
                pred_xstart = process_xstart(model_output)
            else:
                pred_xstart = process_xstart(self._predict_xstart_from_eps(x_t=x, t=t, eps=model_output))
            model_mean, _, _ = self.q_posterior_mean_variance(x_start=pred_xstart, x_t=x, t=t)
        else:
            raise NotImplementedError(self.model_mean_type)

        assert list(model_mean.shape) == list(model_log_variance.shape) == list(pred_xstart.shape) == list(x.shape)
        return {
            "mean": model_mean,
            "variance": model_variance,
            "log_variance": model_log_variance,
            "pred_xstart": pred_xstart,
        }

    def _predict_xstart_from_eps(self, x_t, t, eps):
        assert list(x_t.shape) == list(eps.shape)
        return (
            _extract_into_tensor(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
            - _extract_into_tensor(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * eps
        )

    def _predict_xstart_from_xprev(self, x_t, t, xprev):
        assert list(x_t.shape) == list(xprev.shape)
        return (  # (xprev - coef2*x_t) / coef1
            _extract_into_tensor(self._recip_posterior_mean_coef1, t, x_t.shape) * xprev
            - _extract_into_tensor(self._posterior_mean_coef2_over_coef1, t, x_t.shape) * x_t
        )

    def _predict_eps_from_xstart(self, x_t, t, pred_xstart):
        return (
            _extract_into_tensor(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t - pred_xstart
        ) / _extract_into_tensor(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape)

    def _scale_timesteps(self, t):
        if self.rescale_timesteps:
            return t.float32() * (1000.0 / self.num_timesteps)
        return t

    def condition_mean(self, cond_fn, p_mean_var, x, t, model_kwargs=None) -> jt.Var:
        """Shift the mean by variance * gradient of log p(y|x) (Sohl-Dickstein et al. 2015)."""
        if model_kwargs is None:
            model_kwargs = {}
        gradient = cond_fn(x, self._scale_timesteps(t), **model_kwargs)
        new_mean = p_mean_var["mean"].float32() + p_mean_var["variance"] * gradient.float32()
        return new_mean

    def condition_score(self, cond_fn, p_mean_var, x, t, model_kwargs=None) -> Dict[str, jt.Var]:
        """Condition through the score (Song et al. 2020): eps <- eps - sqrt(1 - alpha_bar) * cond_fn."""
        if model_kwargs is None:
            model_kwargs = {}
        alpha_bar = _extract_into_tensor(self.alphas_cumprod, t, x.shape)

        eps = self._predict_eps_from_xstart(x, t, p_mean_var["pred_xstart"])
        eps = eps - (1 - alpha_bar).sqrt() * cond_fn(x, self._scale_timesteps(t), **model_kwargs)

        out = p_mean_var.copy()
        out["pred_xstart"] = self._predict_xstart_from_eps(x, t, eps)
        out["mean"], _, _ = self.q_posterior_mean_variance(x_start=out["pred_xstart"], x_t=x, t=t)
        return out

    def p_sample(
        self, model, x, t, clip_denoised=True, denoised_fn=None, cond_fn=None, model_kwargs=None
    ) -> Dict[str, jt.Var]:
        """Sample x_{t-1} from the model at the given timestep: {"sample", "pred_xstart"}."""
        t = _as_int_timesteps(t)
        out = self.p_mean_variance(
            model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs
        )
        noise = jt.randn_like(x)  # drawn before cond_fn, as in the reference
        nonzero_mask = (t != 0).float32().reshape([-1] + [1] * (len(x.shape) - 1))  # no noise when t == 0
        if cond_fn is not None:
            out["mean"] = self.condition_mean(cond_fn, out, x, t, model_kwargs=model_kwargs)
        sample = out["mean"] + nonzero_mask * jt.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def p_sample_loop(
        self,
        model,
        shape,
        noise=None,
        clip_denoised=True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs=None,
        device=None,
        progress=False,
    ) -> jt.Var:
        """Generate samples from the model by ancestral sampling; returns the final x_0 batch."""
        final = None
        for sample in self.p_sample_loop_progressive(
            model,
            shape,
            noise=noise,
            clip_denoised=clip_denoised,
            denoised_fn=denoised_fn,
            cond_fn=cond_fn,
            model_kwargs=model_kwargs,
            device=device,
            progress=progress,
        ):
            final = sample
        return final["sample"]

    def p_sample_loop_progressive(
        self,
        model,
        shape,
        noise=None,
        clip_denoised=True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs=None,
        device=None,
        progress=False,
    ) -> Iterator[Dict[str, jt.Var]]:
        """Ancestral sampling that yields each step's {"sample", "pred_xstart"} (device is accepted and ignored)."""
        for out in self._sample_steps(self.p_sample, model, shape, noise, progress, dict(
            clip_denoised=clip_denoised, denoised_fn=denoised_fn, cond_fn=cond_fn, model_kwargs=model_kwargs
        )):
            yield out

    def _sample_steps(self, step_fn, model, shape, noise, progress, kwargs) -> Iterator[Dict[str, jt.Var]]:
        """The shared T-1..0 loop: one step per iteration, each evaluated (synced) before it is yielded.

        Evaluating every step separately keeps each step's graph identical, so the kernels compiled for the first
        step are reused by all later ones.
        """
        assert isinstance(shape, (tuple, list))
        if noise is not None:
            img = noise if isinstance(noise, jt.Var) else jt.array(np.asarray(noise, dtype=np.float32))
        else:
            img = jt.randn(*shape)
        img.sync()
        indices = list(range(self.num_timesteps))[::-1]
        if progress:
            from tqdm.auto import tqdm

            indices = tqdm(indices)
        for i in indices:
            t = _timestep_var(np.full((shape[0],), i, dtype=np.int32))
            with jt.no_grad():
                out = step_fn(model, img, t, **kwargs)
            jt.sync(list(out.values()))
            yield out
            img = out["sample"]

    # ------------------------------------------------------------------ DDIM

    def ddim_sample(
        self, model, x, t, clip_denoised=True, denoised_fn=None, cond_fn=None, model_kwargs=None, eta=0.0
    ) -> Dict[str, jt.Var]:
        """Sample x_{t-1} from the model using DDIM: {"sample", "pred_xstart"}."""
        t = _as_int_timesteps(t)
        out = self.p_mean_variance(
            model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs
        )
        if cond_fn is not None:
            out = self.condition_score(cond_fn, out, x, t, model_kwargs=model_kwargs)

        # Usually our model outputs epsilon, but we re-derive it in case we used x_start or x_prev prediction.
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])

        alpha_bar = _extract_into_tensor(self.alphas_cumprod, t, x.shape)
        alpha_bar_prev = _extract_into_tensor(self.alphas_cumprod_prev, t, x.shape)
        sigma = eta * jt.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * jt.sqrt(1 - alpha_bar / alpha_bar_prev)
        # Equation 12.
        noise = jt.randn_like(x)  # drawn even when eta == 0, as in the reference
        mean_pred = out["pred_xstart"] * jt.sqrt(alpha_bar_prev) + jt.sqrt(1 - alpha_bar_prev - sigma**2) * eps
        nonzero_mask = (t != 0).float32().reshape([-1] + [1] * (len(x.shape) - 1))  # no noise when t == 0
        sample = mean_pred + nonzero_mask * sigma * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_reverse_sample(
        self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None, eta=0.0
    ) -> Dict[str, jt.Var]:
        """Sample x_{t+1} from the model using the DDIM reverse ODE (deterministic, eta must be 0)."""
        assert eta == 0.0, "Reverse ODE only for deterministic path"
        t = _as_int_timesteps(t)
        out = self.p_mean_variance(
            model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs
        )
        # Usually our model outputs epsilon, but we re-derive it in case we used x_start or x_prev prediction.
        eps = (
            _extract_into_tensor(self.sqrt_recip_alphas_cumprod, t, x.shape) * x - out["pred_xstart"]
        ) / _extract_into_tensor(self.sqrt_recipm1_alphas_cumprod, t, x.shape)
        alpha_bar_next = _extract_into_tensor(self.alphas_cumprod_next, t, x.shape)

        # Equation 12. reversed
        mean_pred = out["pred_xstart"] * jt.sqrt(alpha_bar_next) + jt.sqrt(1 - alpha_bar_next) * eps
        return {"sample": mean_pred, "pred_xstart": out["pred_xstart"]}

    def ddim_sample_loop(
        self,
        model,
        shape,
        noise=None,
        clip_denoised=True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs=None,
        device=None,
        progress=False,
        eta=0.0,
    ) -> jt.Var:
        """Generate samples from the model using DDIM; returns the final x_0 batch."""
        final = None
        for sample in self.ddim_sample_loop_progressive(
            model,
            shape,
            noise=noise,
            clip_denoised=clip_denoised,
            denoised_fn=denoised_fn,
            cond_fn=cond_fn,
            model_kwargs=model_kwargs,
            device=device,
            progress=progress,
            eta=eta,
        ):
            final = sample
        return final["sample"]

    def ddim_sample_loop_progressive(
        self,
        model,
        shape,
        noise=None,
        clip_denoised=True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs=None,
        device=None,
        progress=False,
        eta=0.0,
    ) -> Iterator[Dict[str, jt.Var]]:
        """DDIM sampling that yields each step's {"sample", "pred_xstart"} (device is accepted and ignored)."""
        for out in self._sample_steps(self.ddim_sample, model, shape, noise, progress, dict(
            clip_denoised=clip_denoised,
            denoised_fn=denoised_fn,
            cond_fn=cond_fn,
            model_kwargs=model_kwargs,
            eta=eta,
        )):
            yield out

    # ------------------------------------------------------------------ DPM-Solver++

    def dpm_solver_sample_loop(
        self,
        model,
        shape,
        noise=None,
        clip_denoised=True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs=None,
        device=None,
        progress=False,
        order=2,
    ) -> jt.Var:
        """Generate samples with the multistep DPM-Solver++ of the given order (1-3); returns the final x_0 batch."""
        final = None
        for sample in self.dpm_solver_sample_loop_progressive(
            model,
            shape,
            noise=noise,
            clip_denoised=clip_denoised,
            denoised_fn=denoised_fn,
            cond_fn=cond_fn,
            model_kwargs=model_kwargs,
            device=device,
            progress=progress,
            order=order,
        ):
            final = sample
        return final["sample"]

    def dpm_solver_sample_loop_progressive(
        self,
        model,
        shape,
        noise=None,
        clip_denoised=True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs=None,
        device=None,
        progress=False,
        order=2,
    ) -> Iterator[Dict[str, jt.Var]]:
        """DPM-Solver++ sampling that yields each step's {"sample", "pred_xstart"} (device is accepted and ignored)."""
        for out in self._sample_steps(DPMSolverStep(self, order), model, shape, noise, progress, dict(
            clip_denoised=clip_denoised, denoised_fn=denoised_fn, cond_fn=cond_fn, model_kwargs=model_kwargs
        )):
            yield out

    # ------------------------------------------------------------------ UniPC

    def unipc_sample_loop(
        self,
        model,
        shape,
        noise=None,
        clip_denoised=True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs=None,
        device=None,
        progress=False,
        order=2,
        variant="bh2",
    ) -> jt.Var:
        """Generate samples with UniPC (predictor order 1-3, B(h) variant bh1 or bh2); returns the final x_0 batch."""
        final = None
        for sample in self.unipc_sample_loop_progressive(
            model,
            shape,
            noise=noise,
            clip_denoised=clip_denoised,
            denoised_fn=denoised_fn,
            cond_fn=cond_fn,
            model_kwargs=model_kwargs,
            device=device,
            progress=progress,
            order=order,
            variant=variant,
        ):
            final = sample
        return final["sample"]

    def unipc_sample_loop_progressive(
        self,
        model,
        shape,
        noise=None,
        clip_denoised=True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs=None,
        device=None,
        progress=False,
        order=2,
        variant="bh2",
    ) -> Iterator[Dict[str, jt.Var]]:
        """UniPC sampling that yields each step's predicted {"sample", "pred_xstart"} (device is accepted and
        ignored); a yielded sample is corrected in the next step, after the model has been called there."""
        for out in self._sample_steps(UniPCStep(self, order, variant), model, shape, noise, progress, dict(
            clip_denoised=clip_denoised, denoised_fn=denoised_fn, cond_fn=cond_fn, model_kwargs=model_kwargs
        )):
            yield out

    # ------------------------------------------------------------------ variational bound and losses

    def _vb_terms_bpd(self, model, x_start, x_t, t, clip_denoised=True, model_kwargs=None) -> Dict[str, jt.Var]:
        """One term of the variational lower bound, in bits per dimension: {"output", "pred_xstart"}."""
        t = _as_int_timesteps(t)
        true_mean, _, true_log_variance_clipped = self.q_posterior_mean_variance(x_start=x_start, x_t=x_t, t=t)
        out = self.p_mean_variance(model, x_t, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
        kl = normal_kl(true_mean, true_log_variance_clipped, out["mean"], out["log_variance"])
        kl = mean_flat(kl) / np.log(2.0)

        decoder_nll = -discretized_gaussian_log_likelihood(
            x_start, means=out["mean"], log_scales=0.5 * out["log_variance"]
        )
        assert list(decoder_nll.shape) == list(x_start.shape)
        decoder_nll = mean_flat(decoder_nll) / np.log(2.0)

        # At the first timestep return the decoder NLL, otherwise KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)).
        # Both branches are finite (the likelihood clamps before every log), so the masked-out one contributes a
        # zero, not a NaN, gradient.
        output = jt.ternary(t == 0, decoder_nll, kl)
        return {"output": output, "pred_xstart": out["pred_xstart"]}

    def training_losses(self, model, x_start, t, model_kwargs=None, noise=None) -> Dict[str, jt.Var]:
        """Per-example training losses for one batch: a dict with "loss" (and "mse"/"vb" where they apply)."""
        if model_kwargs is None:
            model_kwargs = {}
        t = _as_int_timesteps(t)
        if noise is None:
            noise = jt.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise=noise)

        terms = {}

        if self.loss_type == LossType.KL or self.loss_type == LossType.RESCALED_KL:
            terms["loss"] = self._vb_terms_bpd(
                model=model, x_start=x_start, x_t=x_t, t=t, clip_denoised=False, model_kwargs=model_kwargs
            )["output"]
            if self.loss_type == LossType.RESCALED_KL:
                terms["loss"] = terms["loss"] * self.num_timesteps
        elif self.loss_type == LossType.MSE or self.loss_type == LossType.RESCALED_MSE:
            model_output = model(x_t, self._scale_timesteps(t), **model_kwargs)

            if self.model_var_type in [ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE]:
                B, C = x_t.shape[:2]
                assert list(model_output.shape) == [B, C * 2] + list(x_t.shape[2:])
                model_output, model_var_values = model_output[:, :C], model_output[:, C:]
                # Learn the variance using the variational bound, but don't let it affect our mean prediction.
                frozen_out = jt.concat([model_output.detach(), model_var_values], dim=1)
                terms["vb"] = self._vb_terms_bpd(
                    model=lambda *args, r=frozen_out, **kwargs: r,
                    x_start=x_start,
                    x_t=x_t,
                    t=t,
                    clip_denoised=False,
                )["output"]
                if self.loss_type == LossType.RESCALED_MSE:
                    # Divide by 1000 for equivalence with initial implementation.
                    # Without a factor of 1/1000, the VB term hurts the MSE term.
                    terms["vb"] = terms["vb"] * (self.num_timesteps / 1000.0)

            target = {
                ModelMeanType.PREVIOUS_X: lambda: self.q_posterior_mean_variance(x_start=x_start, x_t=x_t, t=t)[0],
                ModelMeanType.START_X: lambda: x_start,
                ModelMeanType.EPSILON: lambda: noise,
            }[self.model_mean_type]()
            assert list(model_output.shape) == list(target.shape) == list(x_start.shape)
            terms["mse"] = mean_flat((target - model_output) ** 2)
            if "vb" in terms:
                terms["loss"] = terms["mse"] + terms["vb"]
            else:
                terms["loss"] = terms["mse"]
        else:
            raise NotImplementedError(self.loss_type)

        return terms

    def _prior_bpd(self, x_start) -> jt.Var:
        """The prior KL term of the variational bound, in bits per dimension (not learned; for completeness)."""
        batch_size = x_start.shape[0]
        t = _timestep_var(np.full((batch_size,), self.num_timesteps - 1, dtype=np.int32))
        qt_mean, _, qt_log_variance = self.q_mean_variance(x_start, t)
        kl_prior = normal_kl(mean1=qt_mean, logvar1=qt_log_variance, mean2=0.0, logvar2=0.0)
        return mean_flat(kl_prior) / np.log(2.0)

    def calc_bpd_loop(self, model, x_start, clip_denoised=True, model_kwargs=None) -> Dict[str, jt.Var]:
        """The whole variational bound in bits per dimension, plus per-timestep terms (N x T arrays)."""
        batch_size = x_start.shape[0]

        vb = []
        xstart_mse = []
        mse = []
        for t in list(range(self.num_timesteps))[::-1]:
            t_batch = _timestep_var(np.full((batch_size,), t, dtype=np.int32))
            noise = jt.randn_like(x_start)
            x_t = self.q_sample(x_start=x_start, t=t_batch, noise=noise)
            # Calculate VLB term at the current timestep
            with jt.no_grad():
                out = self._vb_terms_bpd(
                    model, x_start=x_start, x_t=x_t, t=t_batch, clip_denoised=clip_denoised, model_kwargs=model_kwargs
                )
                step_vb = out["output"]
                step_xstart_mse = mean_flat((out["pred_xstart"] - x_start) ** 2)
                eps = self._predict_eps_from_xstart(x_t, t_batch, out["pred_xstart"])
                step_mse = mean_flat((eps - noise) ** 2)
            jt.sync([step_vb, step_xstart_mse, step_mse])
            vb.append(step_vb)
            xstart_mse.append(step_xstart_mse)
            mse.append(step_mse)

        vb = jt.stack(vb, dim=1)
        xstart_mse = jt.stack(xstart_mse, dim=1)
        mse = jt.stack(mse, dim=1)

        prior_bpd = self._prior_bpd(x_start)
        total_bpd = vb.sum(dim=1) + prior_bpd
        return {
            "total_bpd": total_bpd,
            "prior_bpd": prior_bpd,
            "vb": vb,
            "xstart_mse": xstart_mse,
            "mse": mse,
        }


# Float64 Vars of the schedule arrays, made once per array so every step gathers from the same Var.
_SCHEDULE_VARS: Dict[int, tuple] = {}


def _schedule_var(arr: np.ndarray) -> jt.Var:
    """A float64 Var holding arr, cached for the lifetime of arr."""
    key = id(arr)
    hit = _SCHEDULE_VARS.get(key)
    if hit is not None and hit[0]() is arr:
        return hit[1]
    var = jt.array(np.ascontiguousarray(arr, dtype=np.float64), dtype="float64")
    var.stop_grad()
    try:
        ref = weakref.ref(arr, lambda _r, k=key: _SCHEDULE_VARS.pop(k, None))
    except TypeError:  # not weak-referenceable (should not happen for ndarrays): do not cache
        return var
    _SCHEDULE_VARS[key] = (ref, var)
    return var


def _extract_into_tensor(arr, timesteps, broadcast_shape: Sequence[int]) -> jt.Var:
    """Gather arr[timesteps] (float64), cast to float32 and broadcast to broadcast_shape.

    :param arr: a 1-D numpy array (or float64 Var) of schedule values.
    :param timesteps: an int Var of indices into arr, one per batch element.
    :param broadcast_shape: a larger shape of K dimensions with the batch dimension equal to len(timesteps).
    """
    if isinstance(arr, jt.Var):
        src = arr
    else:
        src = _schedule_var(arr)
    timesteps = _as_int_timesteps(timesteps)
    res = src[timesteps].float32()
    res = res.reshape(list(res.shape) + [1] * (len(broadcast_shape) - len(res.shape)))
    return res.broadcast(list(broadcast_shape))
