"""
Post-hoc EMA reconstruction from the power-function EMA snapshots a run saved (``phema_<std>_<step>.pt``, written
by every trainer with --ema_std / --ema-std): the EMA of any relative std at a snapshot's step, as the least-squares
combination of the stored snapshots up to that step (EDM2, Algorithm 3).
"""

import os
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

import numpy as np

from .. import checkpoint
from ..errors import CheckpointError, UserError
from .ema import stds_and_steps
from .phema import MAX_STD, solve_posthoc_coefficients

# Above this condition number the snapshots' profiles are too alike to be told apart (float64 solve).
MAX_CONDITION = 1e12


class Snapshot(NamedTuple):
    """One stored power-function EMA."""

    std: float
    step: int
    path: str


def snapshot_folder(log_dir: str) -> str:
    """The folder holding a run's snapshots: log_dir itself (ADM), or its checkpoints/ (a DiT run folder)."""
    nested = os.path.join(log_dir, "checkpoints")
    if not _snapshots_in(log_dir) and os.path.isdir(nested):
        return nested
    return log_dir


def _snapshots_in(folder: str) -> List[Snapshot]:
    if not os.path.isdir(folder):
        return []
    return [Snapshot(std, step, os.path.join(folder, name)) for std, step, name in stds_and_steps(os.listdir(folder))]


def list_snapshots(log_dir: str) -> List[Snapshot]:
    """Every power-function EMA snapshot of a run (ADM log dir or DiT run folder), by step then std; raises
    UserError when there are none."""
    if not os.path.isdir(log_dir):
        raise UserError("--log_dir %s is not a directory: give a training run's log directory (ADM: OPENAI_LOGDIR; "
                        "DiT: results/NNN-model)" % log_dir)
    folder = snapshot_folder(log_dir)
    found = _snapshots_in(folder)
    if not found:
        raise UserError("no power-function EMA snapshots (phema_<std>_<step>.pt) in %s: train with --ema_std "
                        "(DiT: --ema-std), e.g. 0.05,0.1, to save them with every checkpoint" % folder)
    return found


def select_snapshots(snapshots: List[Snapshot], std: float, step: Optional[int]) -> Tuple[List[Snapshot], int]:
    """The snapshots a reconstruction at `step` (default: the newest) uses, and that step; raises UserError for a
    std outside (0, MAX_STD], a step without snapshots, or a set from which the std cannot be told apart."""
    if not 0.0 < std <= MAX_STD:
        raise UserError("--std %g is outside (0, %g]: the relative standard deviation of the EMA profile, e.g. 0.05 "
                        "(short) to 0.15 (long)" % (std, MAX_STD))
    steps = sorted({s.step for s in snapshots})
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise UserError("--step %d has no snapshot: the run saved snapshots at steps %s" % (step, _ranges(steps)))
    used = [s for s in snapshots if 0 < s.step <= step]
    stds = sorted({s.std for s in used})
    if len(used) == 1 and abs(used[0].std - std) > 5e-4:
        raise UserError("only one snapshot (%s) up to step %d: the least squares is ill-posed (one profile cannot "
                        "be reshaped into another std); reconstruct at a later step, or save more often (two stds "
                        "such as --ema_std 0.05,0.1 make the best reconstructions)" % (os.path.basename(used[0].path),
                                                                                     step))
    gram_condition = _condition(used)
    if gram_condition > MAX_CONDITION:
        raise UserError("the snapshots up to step %d are too alike to reconstruct from (condition number %.1e%s): "
                        "the least squares is ill-posed; save snapshots at more distinct steps or stds"
                        % (step, gram_condition, ", one std only: %g" % stds[0] if len(stds) == 1 else ""))
    return used, step


def _condition(used: List[Snapshot]) -> float:
    from .phema import power_function_correlation

    t = np.array([s.step for s in used], np.float64)
    d = np.array([s.std for s in used], np.float64)
    return float(np.linalg.cond(power_function_correlation(t[:, None], d[:, None], t[None, :], d[None, :])))


def _ranges(steps: List[int]) -> str:
    return ", ".join(str(s) for s in steps) if len(steps) <= 12 else "%d, %d, ..., %d (%d steps)" % (
        steps[0], steps[1], steps[-1], len(steps))


def reconstruct(used: List[Snapshot], std: float, step: int) -> Tuple[Dict[str, Any], np.ndarray]:
    """The EMA of relative std `std` at `step` as a state dict (float32, keys of the snapshots), and the
    coefficient of each used snapshot."""
    coefficients = solve_posthoc_coefficients([s.step for s in used], [s.std for s in used], step, std)[:, 0]
    total: Dict[str, Any] = {}
    for snapshot, coefficient in zip(used, coefficients):
        state = checkpoint.load_file(snapshot.path)
        if not isinstance(state, dict):
            raise CheckpointError("%s is not a state dict: a power-function EMA snapshot holds a model's weights"
                                  % snapshot.path)
        if total and set(state) != set(total):
            raise CheckpointError("%s holds other weights than the earlier snapshots (another model?)" % snapshot.path)
        for name, value in state.items():
            value = np.asarray(value)
            if value.dtype.kind != "f":
                total[name] = value  # not averaged (integer buffers): the newest snapshot's
            else:
                total[name] = total.get(name, 0.0) + coefficient * value.astype(np.float64)
    state_dict = {k: (v.astype(np.float32) if v.dtype.kind == "f" else v) for k, v in total.items()}
    return state_dict, coefficients
