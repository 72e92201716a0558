"""
Safeguards of long training runs, shared by every training loop (ADM's TrainLoop and ClassifierTrainLoop, DiT's
train.py): a stop signal (SIGTERM from a scheduler's pre-emption, SIGINT from Ctrl-C) finishes the step in flight,
writes a complete checkpoint set and exits with 128 + the signal number; a non-finite loss or gradient stops the
run before a checkpoint holding it can be written; an fp16 loss scale that keeps collapsing stops it too.

Every decision is taken by all MPI ranks together (one small all-reduce per step), so they stop at the same step.
While the guard is entered, the signals reach a thread that computes nothing (`cpu.signals_off_compute_threads`:
a handler running inside oneDNN's GEMM would corrupt the heap).
"""

import contextlib
import math
import signal
import sys
import threading
from typing import Callable, Dict, Mapping, Optional

import numpy as np

from . import dist_util
from .cpu import signals_off_compute_threads
from .errors import UserError

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# Consecutive fp16 overflow steps (each halves the loss scale) after which a run is stopped instead of running on
# without learning.
MAX_OVERFLOW_STREAK = 20


class TrainingDiverged(UserError):
    """The loss, the gradients or the weights went non-finite (or the fp16 loss scale kept falling)."""


def _nonfinite_terms(losses: Mapping[str, float]):
    return sorted(k for k, v in losses.items() if not math.isfinite(float(v)))


class RunGuard:
    """Watches a training loop: stop signals, non-finite values, and the newest checkpoint written.

    Use it as a context manager around the loop (it installs SIGTERM/SIGINT handlers in the main thread and
    restores the previous ones on exit); call `after_step` once per optimizer step on every rank.
    """

    def __init__(self, log: Callable[[str], None] = print, last_checkpoint: Optional[str] = None):
        self.log = log
        self.last_checkpoint = last_checkpoint
        self.received: Optional[int] = None  # the first signal this process received
        self.stop_signal: Optional[int] = None  # the signal every rank agreed to stop for
        self.overflow_streak = 0
        self._previous: Dict[int, object] = {}
        self._routing: Optional[contextlib.ExitStack] = None

    # -- signals ------------------------------------------------------------------------------------------------
    def __enter__(self) -> "RunGuard":
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._on_signal)
            self._routing = contextlib.ExitStack()
            self._routing.enter_context(signals_off_compute_threads())
        return self

    def __exit__(self, *exc) -> None:
        if self._routing is not None:
            self._routing.close()
            self._routing = None
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _on_signal(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.received is None:
            self.received = signum
            sys.stderr.write("%s received: finishing the current step, then saving a checkpoint and exiting "
                             "(send SIGKILL to stop at once)\n" % name)
        else:
            sys.stderr.write("%s received again: still finishing the step and saving (saves are atomic)\n" % name)
        sys.stderr.flush()

    # -- per step -------------------------------------------------------------------------------------------------
    def after_step(self, step: int, losses: Mapping[str, float]) -> bool:
        """Check the step that just ended (number `step`, 1-based count of updates) on every rank together.

        Raises TrainingDiverged when any rank's loss terms are non-finite; returns True when any rank received a
        stop signal (then save and call `exit_after_save`).
        """
        bad = _nonfinite_terms(losses)
        flags = np.array([self.received == signal.SIGTERM, self.received == signal.SIGINT, bool(bad)],
                         dtype=np.int64)
        flags = dist_util.all_reduce_sum_array(flags)
        if flags[2]:
            self._diverged(step, bad)
        if flags[0] or flags[1]:
            self.stop_signal = signal.SIGTERM if flags[0] else signal.SIGINT
        return self.stop_signal is not None

    def skipped_step(self, step: int, lg_loss_scale: float) -> None:
        """Count an fp16 overflow step (skipped, as the reference does); stop after MAX_OVERFLOW_STREAK in a row."""
        self.overflow_streak += 1
        if self.overflow_streak >= MAX_OVERFLOW_STREAK:
            raise TrainingDiverged(
                "the fp16 gradients overflowed %d steps in a row (up to step %d; the loss scale fell to 2**%g): the "
                "run is not learning. %s. Lower --lr, or train with --use_fp16 False"
                % (self.overflow_streak, step, lg_loss_scale, self._last_checkpoint_text()))

    def took_step(self) -> None:
        """Reset the overflow count after a step that updated the weights."""
        self.overflow_streak = 0

    def nonfinite_gradients(self, step: int, losses: Mapping[str, float]) -> None:
        """Stop a float32 run whose gradients (all-reduced, hence the same on every rank) are non-finite, naming
        this rank's non-finite loss terms."""
        self._diverged(step, _nonfinite_terms(losses), what="the gradients")

    def _diverged(self, step: int, bad_terms, what: str = "the loss on another rank") -> None:
        detail = ("the loss terms %s" % ", ".join(bad_terms)) if bad_terms else what
        raise TrainingDiverged(
            "%s went non-finite (NaN or inf) at step %d; nothing was saved from it. %s. Lower --lr, check the data "
            "for broken images, or resume from that checkpoint with other settings"
            % (detail, step, self._last_checkpoint_text()))

    def check_finite_weights(self, step: int, sums_of_squares: np.ndarray) -> None:
        """Refuse to save weights whose sums of squares are non-finite (all ranks hold the same weights)."""
        if not np.all(np.isfinite(sums_of_squares)):
            raise TrainingDiverged(
                "the weights went non-finite (NaN or inf) by step %d; that checkpoint was not written. %s. Lower "
                "--lr, or resume from that checkpoint with other settings" % (step, self._last_checkpoint_text()))

    def saved(self, path: str) -> None:
        """Remember the newest checkpoint written (named in later messages)."""
        self.last_checkpoint = path

    def exit_after_save(self, step: int, path: Optional[str]) -> None:
        """Log where the run stopped and exit with 128 + the signal number (143 for SIGTERM, 130 for SIGINT)."""
        name = signal.Signals(self.stop_signal).name
        where = ("the checkpoint set at step %d is %s; run the same command again to continue" % (step, path)
                 if path else "no checkpoint was due")
        self.log("stopped by %s after step %d: %s" % (name, step, where))
        raise SystemExit(128 + int(self.stop_signal))

    def _last_checkpoint_text(self) -> str:
        if self.last_checkpoint:
            return "The last good checkpoint is %s" % self.last_checkpoint
        return "No checkpoint was written before it"
