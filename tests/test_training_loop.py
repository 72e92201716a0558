"""Tests for guided_diffusion.training.loop: when the one loop seeds, averages, saves and stops."""

import jittor as jt
import numpy as np
import pytest

from guided_diffusion.run_guard import RunGuard, TrainingDiverged
from guided_diffusion.training.ema import PowerFunctionEMA
from guided_diffusion.training.loop import StepOutcome, TrainingLoop, stop_step


def _loop(saved, stop_at, save_interval=3, on_save=(), emas=()):
    weight = jt.zeros(2)
    loop = TrainingLoop(seed=0, guard=RunGuard(log=lambda m: None), emas=emas, params=lambda: [weight],
                        sync_vars=lambda: [weight], save=lambda n: saved.append(n) or "set%d" % n,
                        save_interval=save_interval, stop_at=stop_at, on_save=on_save)
    return loop, weight


def test_sets_are_saved_every_interval_and_at_the_end():
    saved, draws = [], []

    def step_fn(step):
        draws.append(float(np.random.rand()))
        return StepOutcome(True, {"loss": 1.0})

    loop, _ = _loop(saved, stop_at=7)
    assert loop.run(0, step_fn) == 7
    assert saved == [3, 6, 7]
    again = []
    loop.run(0, lambda step: again.append(float(np.random.rand())) or StepOutcome(True, {"loss": 1.0}))
    assert again == draws  # each step is seeded from (seed, step)


def test_a_resumed_loop_starts_at_its_step_and_an_on_save_hook_can_end_the_run():
    saved = []
    loop, _ = _loop(saved, stop_at=None, save_interval=2, on_save=[lambda n, path: n >= 6])
    assert loop.run(3, lambda step: StepOutcome(True, {"loss": 0.5})) == 6
    assert saved == [4, 6]


def test_periodic_hooks_run_after_every_nth_step():
    saved, calls = [], []
    weight = jt.zeros(2)
    loop = TrainingLoop(seed=0, guard=RunGuard(log=lambda m: None), emas=(), params=lambda: [weight],
                        sync_vars=lambda: [weight], save=lambda n: saved.append(n), save_interval=100, stop_at=7,
                        periodic=[(3, calls.append)])
    loop.run(0, lambda step: StepOutcome(True, {"loss": 0.0}))
    assert calls == [3, 6] and saved == [7]


def test_averages_are_updated_with_the_count_of_steps_done():
    saved = []
    weight_values = []
    loop, weight = _loop(saved, stop_at=3)
    power = PowerFunctionEMA([weight], [0.1])
    loop.emas = [power]

    def step_fn(step):
        weight.assign(jt.full((2,), float(step + 1)))
        weight_values.append(float(step + 1))
        return StepOutcome(True, {"loss": 0.0})

    loop.run(0, step_fn)
    # step 1 replaces the average (beta_1 = 0); later steps pull it towards the newer weights
    assert 1.0 < float(power.averages[0][0].numpy()[0]) < 3.0


def test_non_finite_gradients_stop_the_run_before_any_save():
    saved = []
    loop, _ = _loop(saved, stop_at=5)
    with pytest.raises(TrainingDiverged, match="at step 1"):
        loop.run(0, lambda step: StepOutcome(False, {"loss": float("nan")}))
    assert saved == []


@pytest.mark.parametrize("natural,max_steps,expected", [(None, 0, None), (100, 0, 100), (None, 7, 7), (100, 7, 7),
                                                        (5, 7, 5)])
def test_the_run_ends_at_the_earlier_of_its_natural_end_and_max_steps(natural, max_steps, expected):
    assert stop_step(natural, max_steps) == expected
