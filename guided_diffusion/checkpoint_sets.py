"""
The checkpoint sets the ADM training loops write into their log directory, and how a run finds them again.

A set at step N (N = optimizer updates done) is ``ema_<rate>_N.pt`` for every EMA rate, ``optN.pt`` and, written
last, ``modelN.pt`` (the file users pass to ``--resume_checkpoint``): a model file therefore means a whole set, and
a save cut short leaves no model file. Rerunning a command in the same log directory continues from the newest
whole set there.
"""

import os
import re
from typing import Any, List, Optional, Sequence, Tuple

from . import checkpoint
from .errors import CheckpointError

_MODEL_FILE = re.compile(r"^model(\d+)\.pt$")


def model_name(step: int) -> str:
    """modelNNNNNN.pt"""
    return f"model{step:06d}.pt"


def ema_name(rate: float, step: int) -> str:
    """ema_<rate>_NNNNNN.pt"""
    return f"ema_{rate}_{step:06d}.pt"


def opt_name(step: int) -> str:
    """optNNNNNN.pt"""
    return f"opt{step:06d}.pt"


def companions(model_path: str, step: int, ema_rates: Sequence[float]) -> List[str]:
    """The files that must sit beside model_path for its set to be whole: one EMA per rate, then the optimizer."""
    folder = os.path.dirname(model_path)
    return [os.path.join(folder, ema_name(r, step)) for r in ema_rates] + [os.path.join(folder, opt_name(step))]


def missing_companions(model_path: str, step: int, ema_rates: Sequence[float]) -> List[str]:
    """The companions of model_path (see `companions`) that do not exist."""
    return [p for p in companions(model_path, step, ema_rates) if not os.path.isfile(p)]


def check_whole_set(model_path: str, step: int, ema_rates: Sequence[float]) -> None:
    """Refuse to resume from a model file of this project's naming whose EMA or optimizer file is missing.

    Resuming without them would restart every EMA from the model and AdamW from zero, silently.
    """
    missing = missing_companions(model_path, step, ema_rates)
    if missing:
        raise CheckpointError(
            "cannot resume from %s: its checkpoint set is incomplete (missing %s). Resume from an earlier whole set "
            "in the same folder, or put the missing files back; to start a new EMA rate from the model weights, "
            "copy %s to the missing ema_<rate>_%06d.pt name" % (
                model_path, ", ".join(os.path.basename(p) for p in missing), os.path.basename(model_path), step))


def newest_whole_set(log_dir: str, ema_rates: Sequence[float]) -> Optional[Tuple[str, int]]:
    """(model path, step) of the newest whole checkpoint set in log_dir (step >= 1), or None."""
    if not log_dir or not os.path.isdir(log_dir):
        return None
    found = []
    for name in os.listdir(log_dir):
        m = _MODEL_FILE.match(name)
        if m and int(m.group(1)) > 0:
            found.append((int(m.group(1)), os.path.join(log_dir, name)))
    for step, path in sorted(found, reverse=True):
        if not missing_companions(path, step, ema_rates):
            return path, step
    return None


def write_set(folder: str, files: Sequence[Tuple[str, Any]], log=None) -> str:
    """Write (name, state) files in order, each atomically; returns the path of the last one (the model file).

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
