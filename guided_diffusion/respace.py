"""
Timestep respacing: run a diffusion process on a subset of its original timesteps (fewer sampling steps).

A Jittor port of guided-diffusion's ``respace.py``. The network always sees the original-schedule timesteps.
"""

from typing import Iterable, List, Optional, Set, Union

import jittor as jt
import numpy as np

from .errors import UserError
from .gaussian_diffusion import GaussianDiffusion


class SpacingError(UserError, ValueError):
    """A --timestep_respacing value cannot be applied to the number of diffusion steps."""


def space_timesteps(
    num_timesteps: int, section_counts: Union[str, Iterable[int]], betas: Optional[np.ndarray] = None
) -> Set[int]:
    """Choose which timesteps of the original process to keep.

    The process is cut into equal sections (as many as there are counts) and each section is strided to keep its
    count. section_counts is a list of ints or a comma-separated string such as "10,15,20"; "ddimN" instead uses
    DDIM's fixed striding, range(0, T, stride), with the stride that gives exactly N steps; "logsnrN" keeps N
    timesteps evenly spaced in log-SNR from T-1 down to 0 (see logsnr_timesteps), "logsnrN@S" from timestep S down
    to 0 (the walk then starts at S); both need the process's betas.
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("logsnr"):
            count_text, at, start_text = section_counts[len("logsnr"):].partition("@")
            try:
                desired_count = int(count_text)
                start = int(start_text) if at else num_timesteps - 1
            except ValueError:
                raise SpacingError(
                    f"invalid timestep respacing {section_counts!r}; use logsnrN or logsnrN@S with integers N "
                    f"(steps) and S (the first timestep), e.g. logsnr20 or logsnr10@990"
                ) from None
            if betas is None:
                raise SpacingError(
                    f"--timestep_respacing {section_counts} spaces the steps by the noise schedule's log-SNR, so "
                    f"it needs the schedule's betas; pass betas to space_timesteps"
                )
            if len(betas) != num_timesteps:
                raise SpacingError(f"{len(betas)} betas given for {num_timesteps} diffusion steps")
            if not 0 <= start < num_timesteps:
                raise SpacingError(
                    f"--timestep_respacing {section_counts}: the first timestep {start} must lie in 0..{num_timesteps - 1}"
                )
            if not 1 <= desired_count <= start + 1:
                raise SpacingError(
                    f"--timestep_respacing {section_counts}: cannot keep {desired_count} distinct timesteps of "
                    f"0..{start}; use 1 to {start + 1} steps"
                )
            # the process's first start + 1 steps are the same betas: their log-SNR grid ends at `start`
            return set(logsnr_timesteps(np.asarray(betas)[: start + 1], desired_count))
        if section_counts.startswith("ddim"):
            try:
                desired_count = int(section_counts[len("ddim"):])
            except ValueError:
                raise SpacingError(
                    f"invalid timestep respacing {section_counts!r}; use ddimN with an integer N, e.g. ddim25"
                ) from None
            for i in range(1, num_timesteps):
                if len(range(0, num_timesteps, i)) == desired_count:
                    return set(range(0, num_timesteps, i))
            raise SpacingError(
                f"cannot create exactly {desired_count} steps with an integer stride from {num_timesteps} "
                f"diffusion steps (--timestep_respacing {section_counts}); pick another ddimN, or a plain count "
                f"such as --timestep_respacing {desired_count}"
            )
        try:
            section_counts = [int(x) for x in section_counts.split(",")]
        except ValueError:
            raise SpacingError(
                f"invalid timestep respacing {section_counts!r}; use comma-separated step counts such as 250 or "
                f"10,15,20, or ddimN"
            ) from None
    section_counts = list(section_counts)
    size_per = num_timesteps // len(section_counts)
    extra = num_timesteps % len(section_counts)
    start_idx = 0
    all_steps: List[int] = []
    for i, section_count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < section_count:
            raise SpacingError(
                f"cannot divide section of {size} steps into {section_count} (--timestep_respacing); use at most "
                f"{size} steps per section"
            )
        if section_count <= 1:
            frac_stride = 1
        else:
            frac_stride = (size - 1) / (section_count - 1)
        cur_idx = 0.0
        taken_steps = []
        for _ in range(section_count):
            taken_steps.append(start_idx + round(cur_idx))  # Python's round: banker's rounding, as the reference
            cur_idx += frac_stride
        all_steps += taken_steps
        start_idx += size
    return set(all_steps)


def logsnr_timesteps(betas: np.ndarray, count: int) -> List[int]:
    """count distinct timesteps from 0 to T-1 (both kept; 0 alone for count 1), evenly spaced in log-SNR.

    The targets are count points evenly spaced in lambda = 0.5 * log(alpha_bar / (1 - alpha_bar)) from lambda(0)
    down to lambda(T-1); each takes the timestep whose lambda is nearest. Where the schedule is coarser than the
    grid (near t = 0; near T-1 for the cosine schedule, whose last beta is clipped to 0.999) several targets share
    a nearest timestep: the k-th (from t = 0) is then held in [k, T-count+k] and at least one above the (k-1)-th,
    so exactly count distinct timesteps remain.
    """
    num_timesteps = len(betas)
    if not 1 <= count <= num_timesteps:
        raise SpacingError(
            f"cannot keep {count} distinct steps of {num_timesteps} diffusion steps (--timestep_respacing "
            f"logsnr{count}); use 1 to {num_timesteps}"
        )
    alphas_cumprod = np.cumprod(1.0 - np.asarray(betas, dtype=np.float64))
    lam = 0.5 * (np.log(alphas_cumprod) - np.log1p(-alphas_cumprod))  # decreasing in t
    targets = np.linspace(lam[0], lam[-1], count)
    nearest = np.abs(lam[None, :] - targets[:, None]).argmin(axis=1)
    steps: List[int] = []
    for k, t in enumerate(nearest):
        t = min(max(int(t), k), num_timesteps - count + k)
        if steps:
            t = max(t, steps[-1] + 1)
        steps.append(t)
    return steps


class SpacedDiffusion(GaussianDiffusion):
    """A diffusion process that keeps only some steps of a base diffusion process.

    :param use_timesteps: a collection (sequence or set) of timesteps from the original process to retain.
    :param kwargs: the kwargs to create the base diffusion process.
    """

    def __init__(self, use_timesteps, **kwargs):
        self.use_timesteps = set(use_timesteps)
        self.timestep_map: List[int] = []
        self.original_num_steps = len(kwargs["betas"])

        base_diffusion = GaussianDiffusion(**kwargs)
        last_alpha_cumprod = 1.0
        new_betas = []
        for i, alpha_cumprod in enumerate(base_diffusion.alphas_cumprod):
            if i in self.use_timesteps:
                new_betas.append(1 - alpha_cumprod / last_alpha_cumprod)
                last_alpha_cumprod = alpha_cumprod
                self.timestep_map.append(i)
        kwargs["betas"] = np.array(new_betas)
        super().__init__(**kwargs)
        self._timestep_map_var = None

    def _map_var(self) -> jt.Var:
        """The timestep map as an int32 Var, built once (so sampling steps gather from the same Var)."""
        if self._timestep_map_var is None:
            var = jt.array(np.array(self.timestep_map, dtype=np.int32))
            var.stop_grad()
            self._timestep_map_var = var
        return self._timestep_map_var

    def p_mean_variance(self, model, *args, **kwargs):
        return super().p_mean_variance(self._wrap_model(model), *args, **kwargs)

    def training_losses(self, model, *args, **kwargs):
        return super().training_losses(self._wrap_model(model), *args, **kwargs)

    def condition_mean(self, cond_fn, *args, **kwargs):
        return super().condition_mean(self._wrap_model(cond_fn), *args, **kwargs)

    def condition_score(self, cond_fn, *args, **kwargs):
        return super().condition_score(self._wrap_model(cond_fn), *args, **kwargs)

    def _wrap_model(self, model):
        if isinstance(model, _WrappedModel):
            return model
        return _WrappedModel(model, self._map_var(), self.rescale_timesteps, self.original_num_steps)

    def _scale_timesteps(self, t):
        # Scaling is done by the wrapped model.
        return t


class _WrappedModel:
    """Calls a model (or cond_fn) with original-schedule timesteps in place of respaced indices."""

    def __init__(self, model, timestep_map, rescale_timesteps, original_num_steps):
        self.model = model
        if not isinstance(timestep_map, jt.Var):
            timestep_map = jt.array(np.asarray(timestep_map, dtype=np.int32))
        self.timestep_map = timestep_map
        self.rescale_timesteps = rescale_timesteps
        self.original_num_steps = original_num_steps

    def __call__(self, x, ts, **kwargs):
        new_ts = self.timestep_map[ts]
        if self.rescale_timesteps:
            new_ts = new_ts.float32() * (1000.0 / self.original_num_steps)
        return self.model(x, new_ts, **kwargs)
