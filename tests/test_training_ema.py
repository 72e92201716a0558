"""Tests for guided_diffusion.training.ema: the multi-rate and power-function EMAs behind one interface."""

import os

import jittor as jt
import numpy as np
import pytest

from guided_diffusion.training.ema import (
    MultiRateEMA,
    PowerFunctionEMA,
    ema_rate_name,
    ema_std_name,
    parse_ema_stds,
    snapshot_file_name,
    stds_and_steps,
)

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "phema", "edm2_phema.npz")


def _trajectory(steps=8, seed=0):
    rng = np.random.RandomState(seed)
    return [[rng.randn(3, 5).astype(np.float32), rng.randn(4).astype(np.float32)] for _ in range(steps)]


def test_power_function_ema_after_k_steps_is_edm2s_recursion_over_the_weights_of_every_step():
    edm2 = np.load(FIXTURE)
    weights = _trajectory(len(edm2["beta_steps"]))
    params = [jt.array(w) for w in weights[0]]
    ema = PowerFunctionEMA(params, [0.05, 0.1])
    reference = [None, None]
    for k, step_weights in enumerate(weights, start=1):
        for p, w in zip(params, step_weights):
            p.assign(jt.array(w))
        ema.update(params, k)
        for i in range(2):
            beta = edm2["betas"][i, k - 1]
            reference[i] = [w.astype(np.float64) for w in step_weights] if reference[i] is None else [
                r + (1 - beta) * (w - r) for r, w in zip(reference[i], step_weights)]
            for got, want in zip(ema.averages[i], reference[i]):
                np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)
    assert list(ema.state()) == ["phema_0.050", "phema_0.100"]


def test_multi_rate_ema_is_the_references_update_and_loads_back():
    weights = _trajectory(3)
    params = [jt.array(w) for w in weights[0]]
    ema = MultiRateEMA(params, [0.9, 0.5])
    expected = [[w.astype(np.float64) for w in weights[0]] for _ in range(2)]
    for step_weights in weights[1:]:
        for p, w in zip(params, step_weights):
            p.assign(jt.array(w))
        ema.update(params, 0)
        for e, rate in zip(expected, (0.9, 0.5)):
            e[:] = [rate * x + (1 - rate) * w for x, w in zip(e, step_weights)]
    for average, e in zip(ema.averages, expected):
        for got, want in zip(average, e):
            np.testing.assert_allclose(got.numpy(), want, rtol=1e-6)
    ema.load("ema_0.5", [jt.zeros((3, 5)), jt.zeros(4)])
    assert float(np.abs(ema.state()["ema_0.5"][0].numpy()).max()) == 0.0
    assert len(ema.vars()) == 4


def test_names_are_built_in_one_place_and_parse_back():
    assert snapshot_file_name(ema_rate_name(0.9999), 100) == "ema_0.9999_000100.pt"
    assert snapshot_file_name(ema_std_name(0.05), 100) == "phema_0.050_000100.pt"
    assert stds_and_steps(["phema_0.100_000002.pt", "phema_0.050_000002.pt", "model000002.pt",
                           "phema_0.050_000001.pt"]) == [(0.05, 1, "phema_0.050_000001.pt"),
                                                         (0.05, 2, "phema_0.050_000002.pt"),
                                                         (0.1, 2, "phema_0.100_000002.pt")]


@pytest.mark.parametrize("text,expected", [("", []), ("0.05,0.1", [0.05, 0.1]), (" 0.28 ", [0.28])])
def test_ema_std_lists_parse(text, expected):
    assert parse_ema_stds(text) == expected


@pytest.mark.parametrize("text", ["0", "0.3", "x", "0.05,0.0501"])
def test_bad_ema_std_lists_are_refused(text):
    with pytest.raises(ValueError):
        parse_ema_stds(text)
