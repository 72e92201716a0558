"""Tests for guided_diffusion.training.phema: the power-function EMA's mathematics against NVlabs/edm2's own outputs.

tests/fixtures/phema/edm2_phema.npz holds what EDM2's training/phema.py (commit 4bf8162, run unmodified in a scratch
virtual environment with torch 2.13.0+cpu; see tests/fixtures/README.md and make_edm2_phema.py beside it) returned
for fixed inputs: std_to_exp, power_function_beta and solve_posthoc_coefficients. Our float64 numpy port must give
the same numbers.
"""

import os

import numpy as np
import pytest

from guided_diffusion.training import phema

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "phema", "edm2_phema.npz")


@pytest.fixture(scope="module")
def edm2():
    return dict(np.load(FIXTURE))


def test_std_to_exp_and_back_match_edm2(edm2):
    np.testing.assert_allclose(phema.std_to_exp(edm2["stds"]), edm2["exps"], rtol=1e-12)
    np.testing.assert_allclose(phema.exp_to_std(phema.std_to_exp(edm2["stds"])), edm2["stds"], rtol=1e-12)


def test_beta_after_each_step_matches_edm2_with_one_image_per_step(edm2):
    ours = [[phema.power_function_beta(s, int(k)) for k in edm2["beta_steps"]] for s in edm2["beta_stds"]]
    np.testing.assert_allclose(ours, edm2["betas"], rtol=1e-12, atol=1e-300)
    assert phema.power_function_beta(0.05, 1) == 0.0  # the first update replaces the average by the weights


@pytest.mark.parametrize("key,upto", [("coef_step4", 4), ("coef_step3", 3)])
def test_posthoc_coefficients_of_a_short_run_match_edm2(edm2, key, upto):
    sel = edm2["in_steps"] <= upto
    ours = phema.solve_posthoc_coefficients(edm2["in_steps"][sel], edm2["in_stds"][sel], upto, edm2["out_stds"])
    np.testing.assert_allclose(ours, edm2[key], rtol=1e-9, atol=1e-12)


def test_posthoc_coefficients_of_a_long_run_match_edm2_and_sum_to_one(edm2):
    ours = phema.solve_posthoc_coefficients(edm2["long_steps"], edm2["long_stds"], 20000, edm2["out_stds"])
    np.testing.assert_allclose(ours, edm2["coef_long"], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(ours.sum(axis=0), 1.0, rtol=1e-12)


def test_a_stored_profile_is_reconstructed_as_itself():
    steps, stds = np.repeat([100, 200, 300], 2), np.tile([0.05, 0.1], 3)
    coefficients = phema.solve_posthoc_coefficients(steps, stds, 300, 0.1)[:, 0]
    np.testing.assert_allclose(coefficients, [0, 0, 0, 0, 0, 1], atol=1e-8)
