"""Tests for guided_diffusion.run_guard: stop signals, non-finite values and collapsing fp16 loss scales."""

import os
import signal
import time

import numpy as np
import pytest

from guided_diffusion.run_guard import MAX_OVERFLOW_STREAK, RunGuard, TrainingDiverged


def _count_handled(guard: RunGuard) -> list:
    """The signals the guard's handler has run for, in order (to wait for: delivery is asynchronous)."""
    handled = []
    on_signal = guard._on_signal

    def counting(signum, frame):
        handled.append(signum)
        on_signal(signum, frame)

    guard._on_signal = counting
    return handled


def _send_and_wait(handled: list, signum: int) -> None:
    before = len(handled)
    os.kill(os.getpid(), signum)
    deadline = time.time() + 10
    while len(handled) == before and time.time() < deadline:
        time.sleep(0.005)
    assert handled[before:] == [signum]


def test_a_signal_inside_the_guard_is_turned_into_a_stop_after_the_step_with_exit_status_128_plus_it():
    logged = []
    guard = RunGuard(log=logged.append)
    handled = _count_handled(guard)
    with guard:
        assert guard.after_step(1, {"loss": 0.5}) is False
        _send_and_wait(handled, signal.SIGTERM)  # handled: no exception here, the process keeps running
        _send_and_wait(handled, signal.SIGINT)  # a second signal changes nothing
        assert guard.after_step(2, {"loss": 0.4}) is True
        with pytest.raises(SystemExit) as info:
            guard.exit_after_save(2, "/runs/model000002.pt")
    assert info.value.code == 143
    assert logged == ["stopped by SIGTERM after step 2: the checkpoint set at step 2 is /runs/model000002.pt; run "
                      "the same command again to continue"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the previous handlers are back


def test_sigint_exits_with_130():
    guard = RunGuard(log=lambda m: None)
    handled = _count_handled(guard)
    with guard:
        _send_and_wait(handled, signal.SIGINT)
        assert guard.after_step(5, {})
        with pytest.raises(SystemExit) as info:
            guard.exit_after_save(5, None)
    assert info.value.code == 130


def test_non_finite_loss_terms_raise_naming_them_the_step_and_the_last_checkpoint():
    guard = RunGuard(last_checkpoint="/runs/model000010.pt")
    guard.saved("/runs/model000020.pt")
    with pytest.raises(TrainingDiverged) as info:
        guard.after_step(23, {"loss": float("nan"), "mse": float("inf"), "vb": 0.1})
    text = str(info.value)
    assert "the loss terms loss, mse" in text and "at step 23" in text and "/runs/model000020.pt" in text


def test_twenty_fp16_overflows_in_a_row_stop_the_run_but_a_good_step_resets_the_count():
    guard = RunGuard()
    for _ in range(MAX_OVERFLOW_STREAK - 1):
        guard.skipped_step(7, 3.0)
    guard.took_step()
    for _ in range(MAX_OVERFLOW_STREAK - 1):
        guard.skipped_step(8, 2.0)
    with pytest.raises(TrainingDiverged, match="overflowed 20 steps in a row"):
        guard.skipped_step(9, 1.0)


def test_non_finite_weights_are_refused():
    guard = RunGuard()
    guard.check_finite_weights(3, np.array([1.0, 2.0]))
    with pytest.raises(TrainingDiverged, match="step 3"):
        guard.check_finite_weights(3, np.array([1.0, np.inf]))
