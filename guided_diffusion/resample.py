"""
Timestep samplers for training: uniform, or importance sampling by the running second moment of each step's loss.

A Jittor port of guided-diffusion's ``resample.py``. Indices are drawn with numpy's global RNG, as the reference.
"""

from abc import ABC, abstractmethod
from typing import Sequence, Tuple

import jittor as jt
import numpy as np

from .errors import UserError
from .gaussian_diffusion import runtime_var


def create_named_schedule_sampler(name: str, diffusion) -> "ScheduleSampler":
    """Create a ScheduleSampler from a library of pre-defined samplers ("uniform", "loss-second-moment")."""
    if name == "uniform":
        return UniformSampler(diffusion)
    elif name == "loss-second-moment":
        return LossSecondMomentResampler(diffusion)
    else:
        raise _UnknownSamplerError(
            f"unknown schedule sampler: {name} (--schedule_sampler); use uniform or loss-second-moment"
        )


class _UnknownSamplerError(UserError, NotImplementedError):
    """An unknown --schedule_sampler name."""


class ScheduleSampler(ABC):
    """A distribution over timesteps in the diffusion process, intended to reduce variance of the objective.

    By default, samplers perform unbiased importance sampling, in which the objective's mean is unchanged. However,
    subclasses may override sample() to change how the resampled terms are reweighted, allowing for actual changes
    in the objective.
    """

    @abstractmethod
    def weights(self) -> np.ndarray:
        """A numpy array of positive weights, one per diffusion step (need not be normalised)."""

    def sample(self, batch_size: int, device=None) -> Tuple[jt.Var, jt.Var]:
        """Importance-sample timesteps for a batch: (int32 timesteps Var, float32 weights Var).

        device is accepted for compatibility and ignored (Jittor places Vars itself).
        """
        w = self.weights()
        p = w / np.sum(w)
        indices_np = np.random.choice(len(p), size=(batch_size,), p=p)
        weights_np = 1 / (len(p) * p[indices_np])
        indices = runtime_var(indices_np, np.int32)
        weights = runtime_var(weights_np, np.float32)
        return indices, weights


class UniformSampler(ScheduleSampler):
    """Every timestep equally likely (all importance weights are 1)."""

    def __init__(self, diffusion):
        self.diffusion = diffusion
        self._weights = np.ones([diffusion.num_timesteps])

    def weights(self) -> np.ndarray:
        return self._weights


def _to_numpy(x) -> np.ndarray:
    if isinstance(x, jt.Var):
        return x.numpy()
    return np.asarray(x)


class LossAwareSampler(ScheduleSampler):
    """A sampler whose weights are updated from the training losses (gathered over all MPI ranks)."""

    def update_with_local_losses(self, local_ts, local_losses) -> None:
        """Update the reweighting from this rank's losses; all ranks must call this with their own batch.

        :param local_ts: an integer Var (or array) of timesteps.
        :param local_losses: a 1-D Var (or array) of losses.
        """
        local_ts = _to_numpy(local_ts).reshape(-1).astype(np.int64)
        local_losses = _to_numpy(local_losses).reshape(-1).astype(np.float64)
        if jt.in_mpi:
            from .dist_util import all_gather_array

            batch_sizes = [int(x[0]) for x in all_gather_array(np.array([len(local_ts)], dtype=np.int32))]
            max_bs = max(batch_sizes)
            # Pad all_gather batches to be the maximum batch size.
            pad_ts = np.zeros([max_bs], dtype=np.int64)
            pad_ts[: len(local_ts)] = local_ts
            pad_losses = np.zeros([max_bs], dtype=np.float64)
            pad_losses[: len(local_losses)] = local_losses
            timestep_batches = all_gather_array(pad_ts)
            loss_batches = all_gather_array(pad_losses)
            timesteps = [int(x) for y, bs in zip(timestep_batches, batch_sizes) for x in y[:bs]]
            losses = [float(x) for y, bs in zip(loss_batches, batch_sizes) for x in y[:bs]]
        else:
            timesteps = [int(x) for x in local_ts]
            losses = [float(x) for x in local_losses]
        self.update_with_all_losses(timesteps, losses)

    @abstractmethod
    def update_with_all_losses(self, ts: Sequence[int], losses: Sequence[float]) -> None:
        """Update the reweighting using losses from the whole (all-ranks) batch; identical on every rank."""


class LossSecondMomentResampler(LossAwareSampler):
    """Sample t proportionally to sqrt(E[loss_t^2]) over a short history, once every step has a full history."""

    def __init__(self, diffusion, history_per_term: int = 10, uniform_prob: float = 0.001):
        self.diffusion = diffusion
        self.history_per_term = history_per_term
        self.uniform_prob = uniform_prob
        self._loss_history = np.zeros([diffusion.num_timesteps, history_per_term], dtype=np.float64)
        self._loss_counts = np.zeros([diffusion.num_timesteps], dtype=np.int64)  # the reference's np.int

    def weights(self) -> np.ndarray:
        if not self._warmed_up():
            return np.ones([self.diffusion.num_timesteps], dtype=np.float64)
        weights = np.sqrt(np.mean(self._loss_history**2, axis=-1))
        weights /= np.sum(weights)
        weights *= 1 - self.uniform_prob
        weights += self.uniform_prob / len(weights)
        return weights

    def update_with_all_losses(self, ts: Sequence[int], losses: Sequence[float]) -> None:
        for t, loss in zip(ts, losses):
            if self._loss_counts[t] == self.history_per_term:
                # Shift out the oldest loss term.
                self._loss_history[t, :-1] = self._loss_history[t, 1:]
                self._loss_history[t, -1] = loss
            else:
                self._loss_history[t, self._loss_counts[t]] = loss
                self._loss_counts[t] += 1

    def _warmed_up(self) -> bool:
        return (self._loss_counts == self.history_per_term).all()
