"""
The one training loop of every trainer: seed -> step -> optimize -> EMA -> log -> save / stop.

A trainer supplies a step function (forward, backward and the optimizer update of one batch, returning a
StepOutcome), the Vars to evaluate after each step, a log hook and a save function; this module decides, in one
place, when steps are seeded, when the averages are updated, when the run guard checks the step, when a checkpoint
set is written and when the run ends. Step numbers: `step` is the 0-based index of the step being taken; after it
the run has done `step + 1` optimizer steps, the number that names checkpoints.
"""

from typing import Any, Callable, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import jittor as jt
import numpy as np
from tqdm import tqdm

from .. import dist_util, seeding
from ..run_guard import RunGuard
from .ema import EMA

# The first key of each random stream of a training run (seeding.derive_seed keys).
_INIT_STREAM, _STEP_STREAM = 0, 1


def seed_training_step(seed: int, step: int) -> None:
    """Seed Python, numpy and Jittor for training step `step` on this rank, so its draws (timesteps, noise,
    dropout) depend on (seed, step, rank) alone: the same after a resume, different on every rank and step."""
    seeding.seed_all(_STEP_STREAM, seed, step, dist_util.get_rank())


def seed_initialisation(seed: int) -> None:
    """Seed every generator for building models: their initial weights then depend on `seed` alone."""
    seeding.seed_all(_INIT_STREAM, seed)


class StepOutcome(NamedTuple):
    """What a step function reports."""

    took: bool  # the optimizer updated the weights (False: an fp16 overflow skipped it, or non-finite gradients)
    losses: Mapping[str, Any]  # this rank's loss terms (floats, or Vars read after the step's sync)
    lg_loss_scale: Optional[float] = None  # the fp16 loss scale (log2) when training in fp16, else None


def stop_step(natural_end: Optional[int], max_steps: Optional[int] = None) -> Optional[int]:
    """The number of optimizer steps after which a run ends: the earlier of its natural end (lr annealing,
    iterations, epochs; None: never) and max_steps (None or 0: no limit)."""
    ends = [n for n in (natural_end, max_steps) if n]
    return min(ends) if ends else None


class TrainingLoop:
    """Drives a trainer's step function; every setting is fixed at construction.

    seed: the run's seed (each step is reseeded from (seed, step, rank)).
    guard: the run guard (stop signals, non-finite values); the loop enters it while it runs.
    emas: the weight averages, updated after every step that changed the weights, from params().
    params: the weights the averages follow (ADM: the master parameters).
    sync_vars: the trainer's state to evaluate after each step (weights, optimizer moments); Jittor is lazy.
    save: writes the checkpoint set after `n` optimizer steps and returns the marker's path (None off rank 0).
    save_interval: a set is written every save_interval optimizer steps, at stop_at, and on a stop signal.
    stop_at: the number of optimizer steps after which the run ends (None: never; see stop_step).
    log: called after each step with its index and outcome (the trainer decides what and how often to log).
    on_save: called with (n, path) after every save; one returning True ends the run (the reference's
        DIFFUSION_TRAINING_TEST stop).
    periodic: (interval, fn) pairs: fn(n) runs on every rank after optimizer step n when n % interval == 0, after the
        step's guard check and save (e.g. a preview grid sampled with the EMA weights).
    progress: the progress bar's title (None: no bar).
    """

    def __init__(self, *, seed: int, guard: RunGuard, emas: Sequence[EMA], params: Callable[[], Sequence[jt.Var]],
                 sync_vars: Callable[[], List[jt.Var]], save: Callable[[int], Optional[str]], save_interval: int,
                 stop_at: Optional[int] = None, log: Callable[[int, StepOutcome], None] = lambda step, out: None,
                 on_save: Sequence[Callable[[int, Optional[str]], bool]] = (),
                 periodic: Sequence[Tuple[int, Callable[[int], None]]] = (), progress: Optional[str] = None):
        self.seed = seed
        self.guard = guard
        self.emas = list(emas)
        self.params = params
        self.sync_vars = sync_vars
        self.save = save
        self.save_interval = save_interval
        self.stop_at = stop_at
        self.log = log
        self.on_save = list(on_save)
        self.periodic = list(periodic)
        self.progress = progress

    def take_step(self, step: int, step_fn: Callable[[], StepOutcome]) -> StepOutcome:
        """Seed, run step_fn (forward, backward, optimize), let the guard judge a skipped update, update the
        averages, evaluate the state."""
        seed_training_step(self.seed, step)
        outcome = step_fn()
        if outcome.took:
            self.guard.took_step()
            params = self.params()
            for ema in self.emas:
                ema.update(params, step + 1)
        elif outcome.lg_loss_scale is not None:
            self.guard.skipped_step(step + 1, outcome.lg_loss_scale)
        else:
            self.guard.nonfinite_gradients(step + 1, _floats(outcome.losses))
        jt.sync(self.sync_vars() + [v for ema in self.emas for v in ema.vars()])
        return outcome

    def run(self, first_step: int, step_fn: Callable[[int], StepOutcome]) -> int:
        """Train from `first_step` optimizer steps done until stop_at (or a stop signal); returns the steps done.

        step_fn(step) takes step number `step` (0-based). A stop signal saves a set and exits (run guard); an
        on_save hook returning True ends the run after that save.
        """
        done = first_step
        bar = tqdm(total=self.stop_at, initial=first_step, desc=self.progress, unit="step", dynamic_ncols=True,
                   disable=self.progress is None or not dist_util.is_main_process())
        try:
            with self.guard:
                while self.stop_at is None or done < self.stop_at:
                    outcome = self.take_step(done, lambda: step_fn(done))
                    bar.update(1)
                    self.log(done, outcome)
                    done += 1
                    stop = self.guard.after_step(done, _floats(outcome.losses))
                    if done % self.save_interval == 0 or done == self.stop_at or stop:
                        path = self.save(done)
                        if stop:
                            bar.close()
                            self.guard.exit_after_save(done, path)
                        if any([hook(done, path) for hook in self.on_save]):
                            break
                    for interval, hook in self.periodic:
                        if done % interval == 0:
                            hook(done)
        finally:
            bar.close()
        return done


def _floats(losses: Mapping[str, Any]) -> Mapping[str, float]:
    out = {}
    for k, v in losses.items():
        if isinstance(v, jt.Var):
            out[k] = float(v.item())
        elif isinstance(v, (list, tuple)):
            out[k] = float(np.mean(v))
        else:
            out[k] = float(v)
    return out
