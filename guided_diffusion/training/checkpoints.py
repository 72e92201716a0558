"""
The checkpoint object of every trainer: named states written as one complete, atomic set on rank 0, the newest
complete set found again, and the run guard's hooks (no non-finite weights saved, a failed save removes its partial
set and stops every rank together, the signal stop saves and exits).

A set at step N (N = optimizer updates done) is a few files written in order, each atomically, the *marker* file
last: a marker file therefore means a whole set, and a save cut short leaves no marker. A layout adapter maps the
named states to files:

* ADMLayout (guided-diffusion's trainers): ``ema_<rate>_N.pt`` per EMA rate and ``phema_<std>_N.pt`` per
  power-function EMA, then ``optN.pt``, then the marker ``modelN.pt`` (N printed %06d);
* DiTLayout (DiT/train.py): ``phema_<std>_N.pt`` (%06d), then the marker ``NNNNNNN.pt`` (%07d) holding
  {"model", "ema", "opt", "args"} as the reference writes it.
"""

import os
import re
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import jittor as jt
import numpy as np

from .. import checkpoint, dist_util
from ..errors import CheckpointError, UserError
from ..fp16_util import sums_of_squares
from ..run_guard import RunGuard
from .ema import snapshot_file_name


class ADMLayout:
    """guided-diffusion's files: EMA files, ``optN.pt``, then ``modelN.pt`` (the file --resume_checkpoint takes)."""

    MARKER = re.compile(r"^model(\d+)\.pt$")

    def __init__(self, ema_names: Sequence[str]):
        """ema_names: the checkpoint names of the run's averages (ema_<rate>, phema_<std>), in write order."""
        self.ema_names = list(ema_names)

    @staticmethod
    def model_name(step: int) -> str:
        """modelNNNNNN.pt"""
        return f"model{step:06d}.pt"

    @staticmethod
    def opt_name(step: int) -> str:
        """optNNNNNN.pt"""
        return f"opt{step:06d}.pt"

    def marker_name(self, step: int) -> str:
        """The set's last file: modelNNNNNN.pt."""
        return self.model_name(step)

    def companion_names(self, step: int) -> List[str]:
        """The files that must sit beside the marker: one per average, then the optimizer's."""
        return [snapshot_file_name(n, step) for n in self.ema_names] + [self.opt_name(step)]

    def files(self, step: int, states: Mapping[str, Any]) -> List[Tuple[str, Any]]:
        """(file name, state) in write order from states {"model", "opt", <ema name>...}: averages, opt, model."""
        return ([(snapshot_file_name(n, step), states[n]) for n in self.ema_names]
                + [(self.opt_name(step), states["opt"]), (self.model_name(step), states["model"])])

    def read(self, folder: str, step: int, log: Callable[[str], None]) -> Dict[str, Any]:
        """The states of the set at `step` in folder, by name (every rank reads them)."""
        states = {}
        for name, file_name in [(n, snapshot_file_name(n, step)) for n in self.ema_names] + [
                ("opt", self.opt_name(step))]:
            path = os.path.join(folder, file_name)
            log(f"loading {'optimizer state' if name == 'opt' else 'EMA'} from checkpoint: {path}"
                + ("" if name == "opt" else "..."))
            states[name] = dist_util.load_state_dict(path, map_location=dist_util.dev())
        return states


class DiTLayout:
    """DiT's files: ``phema_<std>_N.pt`` (%06d), then ``NNNNNNN.pt`` (%07d) with {"model", "ema", "opt", "args"}."""

    MARKER = re.compile(r"^(\d+)\.pt$")
    MAIN_KEYS = ("model", "ema", "opt", "args")

    def __init__(self, ema_names: Sequence[str]):
        """ema_names: the checkpoint names of the power-function EMAs (phema_<std>); DiT's EMA is inside the file."""
        self.ema_names = list(ema_names)

    def marker_name(self, step: int) -> str:
        """The set's last file: NNNNNNN.pt (the reference's name)."""
        return f"{step:07d}.pt"

    def companion_names(self, step: int) -> List[str]:
        """One snapshot file per power-function EMA."""
        return [snapshot_file_name(n, step) for n in self.ema_names]

    def files(self, step: int, states: Mapping[str, Any]) -> List[Tuple[str, Any]]:
        """(file name, state) in write order: the snapshots, then the reference's checkpoint file."""
        return ([(snapshot_file_name(n, step), states[n]) for n in self.ema_names]
                + [(self.marker_name(step), {k: states[k] for k in self.MAIN_KEYS})])

    def read(self, folder: str, step: int, log: Callable[[str], None]) -> Dict[str, Any]:
        """The power-function EMA snapshots of the set at `step` (the main file is read by the caller)."""
        return {n: checkpoint.load_file(os.path.join(folder, snapshot_file_name(n, step))) for n in self.ema_names}


def save_on_main_process(write: Callable[[], Any]) -> None:
    """Run `write` on rank 0 and let every rank know whether it worked, so a failed save stops all ranks together
    (instead of leaving the others waiting at a barrier)."""
    failure: Optional[BaseException] = None
    if dist_util.is_main_process():
        try:
            write()
        except Exception as exc:  # re-raised below, after the other ranks learn of it
            failure = exc
    failed = dist_util.all_reduce_sum_array(np.array([failure is not None], dtype=np.int64))
    if failure is not None:
        raise failure
    if failed[0]:
        raise UserError("rank 0 could not write the checkpoint (see its error in log.txt); the earlier checkpoints "
                        "are intact")


def write_set(folder: str, files: Sequence[Tuple[str, Any]], log: Optional[Callable[[str], None]] = None) -> str:
    """Write (name, state) files in order, each atomically; returns the path of the last one (the marker).

    If a write fails (disk full, unwritable folder), the files this call already wrote are removed, so the folder
    holds only the earlier, whole sets; the error names the file, the folder and the size being written.
    """
    written: List[str] = []
    for name, obj in files:
        path = os.path.join(folder, name)
        if log is not None:
            log(f"saving {name}...")
        try:
            checkpoint.save_file(obj, path)
        except CheckpointError:
            for done in written:
                _remove_quietly(done)
            raise
        written.append(path)
    return written[-1]


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


class CheckpointIO:
    """Saves and finds the checkpoint sets of one run folder, in one layout, under one run guard."""

    def __init__(self, folder: Optional[str], layout, guard: RunGuard, log: Callable[[str], None] = print,
                 log_each_file: bool = True):
        """folder: where sets are written (None on ranks other than 0 where only rank 0 knows it)."""
        self.folder = folder
        self.layout = layout
        self.guard = guard
        self.log = log
        self.log_each_file = log_each_file

    def save(self, step: int, states: Callable[[], Mapping[str, Any]], weights: Sequence[jt.Var]) -> Optional[str]:
        """Write the set at `step` on rank 0 (every rank calls it); returns the marker's path (None where the
        folder is unknown). states() runs on rank 0 only and must only read Vars already computed; weights (every
        rank's, identical) are checked finite first, so a set holding NaN or inf is never written."""
        self.guard.check_finite_weights(step, sums_of_squares(list(weights)))
        files = self.layout.files(step, states()) if dist_util.is_main_process() else []
        save_on_main_process(lambda: write_set(self.folder, files, log=self.log if self.log_each_file else None))
        path = os.path.join(self.folder, self.layout.marker_name(step)) if self.folder else None
        if path:
            self.guard.saved(path)
        return path

    def missing(self, marker_path: str, step: int) -> List[str]:
        """The companions of marker_path (the rest of its set) that do not exist."""
        folder = os.path.dirname(marker_path)
        return [p for p in (os.path.join(folder, n) for n in self.layout.companion_names(step))
                if not os.path.isfile(p)]

    def check_complete(self, marker_path: str, step: int) -> None:
        """Refuse to resume from a set with missing files (resuming would silently restart those states)."""
        missing = self.missing(marker_path, step)
        if missing:
            names = [os.path.basename(p) for p in missing]
            hint = ("; to start a new EMA rate from the model weights, copy %s to the missing ema_<rate>_%06d.pt name"
                    % (os.path.basename(marker_path), step)) if any(n.startswith("ema_") for n in names) else ""
            raise CheckpointError(
                "cannot resume from %s: its checkpoint set is incomplete (missing %s). Resume from an earlier whole "
                "set in the same folder, or put the missing files back%s" % (marker_path, ", ".join(names), hint))

    def newest(self, folder: Optional[str] = None) -> Optional[Tuple[str, int]]:
        """(marker path, step) of the newest complete set (step >= 1) in folder (default: this run's), or None."""
        folder = folder or self.folder
        if not folder or not os.path.isdir(folder):
            return None
        found = []
        for name in os.listdir(folder):
            m = self.layout.MARKER.match(name)
            if m and int(m.group(1)) > 0:
                found.append((int(m.group(1)), os.path.join(folder, name)))
        for step, path in sorted(found, reverse=True):
            if not self.missing(path, step):
                return path, step
        return None

    def read(self, marker_path: str, step: int) -> Dict[str, Any]:
        """The states of the set whose marker is marker_path, but for the marker file itself (the caller's)."""
        return self.layout.read(os.path.dirname(marker_path), step, self.log)
