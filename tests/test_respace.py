"""Tests for guided_diffusion.respace: timestep spacing, respaced betas, and the original-timestep model wrapper."""

import os

import guided_diffusion  # noqa: F401  (prepares Jittor's environment before jittor is imported)
import jittor as jt
import numpy as np
import pytest

from guided_diffusion import gaussian_diffusion as gd
from guided_diffusion.errors import UserError
from guided_diffusion.respace import SpacedDiffusion, SpacingError, _WrappedModel, space_timesteps

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "guided_diffusion", "diffusion_unet64_cond.npz")


@pytest.fixture(scope="module")
def ref():
    return np.load(FIXTURE)


def _spaced(spec, steps=1000, schedule="linear", **kw):
    return SpacedDiffusion(
        use_timesteps=space_timesteps(steps, spec),
        betas=gd.get_named_beta_schedule(schedule, steps),
        model_mean_type=gd.ModelMeanType.EPSILON,
        model_var_type=kw.pop("model_var_type", gd.ModelVarType.FIXED_LARGE),
        loss_type=gd.LossType.MSE,
        **kw,
    )


# The spec's measured table (section 1.4) for T = 1000: spec -> (count, first values, last values).
SPACING_TABLE = {
    "250": (250, [0, 4, 8, 12, 16, 20], [987, 991, 995, 999]),
    "100": (100, [0, 10, 20], [979, 989, 999]),
    "25": (25, [0, 42, 83, 125, 166, 208], [874, 916, 957, 999]),
    "ddim25": (25, [0, 40, 80], [920, 960]),
    "ddim50": (50, [0, 20], [960, 980]),
    "ddim100": (100, [0, 10], [980, 990]),
    "ddim250": (250, [0, 4], [992, 996]),
    "10,10,10": (30, [0, 37, 74, 111, 148, 185], [888, 925, 962, 999]),
}


@pytest.mark.parametrize("spec", sorted(SPACING_TABLE))
def test_space_timesteps_matches_reference_table(spec):
    count, first, last = SPACING_TABLE[spec]
    steps = sorted(space_timesteps(1000, spec))
    assert len(steps) == count
    assert steps[: len(first)] == first
    assert steps[-len(last):] == last


def test_space_timesteps_matches_reference_fixture(ref):
    keys = [k for k in ref.files if k.startswith("space_")]
    assert len(keys) == 5
    for key in keys:
        _, n, spec = key.split("_", 2)
        assert sorted(space_timesteps(int(n), spec.replace("-", ","))) == ref[key].tolist(), key


def test_space_timesteps_uses_bankers_rounding():
    # 10 steps in 1000 => stride 999/9 = 111; 7 of 13 => stride 2 exactly; "3" of 10 => stride 4.5:
    # round(4.5) == 4 (banker's), so the middle index is 4, not 5.
    assert sorted(space_timesteps(10, "3")) == [0, 4, 9]
    assert sorted(space_timesteps(10, [3])) == [0, 4, 9]


def test_space_timesteps_accepts_a_list_of_counts_and_ignores_sections_of_one():
    assert sorted(space_timesteps(20, [1, 2])) == [0, 10, 19]


def test_space_timesteps_rejects_impossible_requests_with_user_errors():
    with pytest.raises(SpacingError):
        space_timesteps(1000, "ddim999")  # no integer stride gives exactly 999 steps of 1000
    with pytest.raises(ValueError):
        space_timesteps(10, "11")
    with pytest.raises(UserError):
        space_timesteps(10, "ten")


def test_spaced_betas_match_spec_values_for_250_steps():
    d = _spaced("250")
    assert d.num_timesteps == 250
    assert d.betas[0] == pytest.approx(9.999999999998899e-5, rel=1e-12)
    assert d.betas[1] == pytest.approx(5.990655644756426e-4, rel=1e-12)
    assert d.betas[249] == pytest.approx(0.07751934499235003, rel=1e-12)
    assert d.alphas_cumprod[249] == pytest.approx(4.035829765375676e-5, rel=1e-10)
    np.testing.assert_allclose(d.posterior_log_variance_clipped[0:2], [-9.36462816, -9.36462816], atol=1e-7)


def test_spaced_betas_and_timestep_map_match_reference_fixture(ref):
    d = _spaced("ddim10", model_var_type=gd.ModelVarType.LEARNED_RANGE)
    np.testing.assert_allclose(d.betas, ref["spaced_betas"], rtol=1e-12, atol=0)
    assert d.timestep_map == ref["spaced_timestep_map"].tolist()
    assert d.original_num_steps == 1000


class _RecordingModel:
    """Returns zeros (eps) and remembers the timesteps it was called with."""

    def __init__(self):
        self.seen = []

    def __call__(self, x, t, **kwargs):
        self.seen.append(t.numpy().copy())
        return jt.zeros_like(x)


def test_model_sees_original_schedule_timesteps():
    d = _spaced("ddim10")
    model = _RecordingModel()
    x = jt.zeros((2, 3, 4, 4))
    d.p_mean_variance(model, x, jt.array(np.array([0, 6], dtype=np.int32)))
    assert model.seen[-1].tolist() == [0, 600]
    assert model.seen[-1].dtype.kind == "i"
    d.training_losses(model, x, jt.array(np.array([9, 1], dtype=np.int32)), noise=jt.zeros_like(x))
    assert model.seen[-1].tolist() == [900, 100]


def test_rescaled_timesteps_are_floats_on_the_1000_scale():
    d = _spaced("5", steps=100, rescale_timesteps=True)
    model = _RecordingModel()
    x = jt.zeros((1, 3, 4, 4))
    d.p_mean_variance(model, x, jt.array(np.array([4], dtype=np.int32)))
    assert d.timestep_map[4] == 99
    np.testing.assert_allclose(model.seen[-1], [990.0], rtol=1e-6)
    assert model.seen[-1].dtype == np.float32


def test_cond_fn_sees_original_schedule_timesteps_too():
    d = _spaced("ddim10")
    seen = []

    def cond_fn(x, t, **kwargs):
        seen.append(t.numpy().tolist())
        return jt.zeros_like(x)

    x = jt.zeros((2, 3, 4, 4))
    t = jt.array(np.array([3, 8], dtype=np.int32))
    out = d.p_mean_variance(lambda x, t, **kw: jt.zeros_like(x), x, t)
    d.condition_mean(cond_fn, out, x, t)
    d.condition_score(cond_fn, out, x, t)
    assert seen == [[300, 800], [300, 800]]


def test_wrapped_model_is_not_wrapped_twice():
    d = _spaced("ddim10")
    wrapped = d._wrap_model(lambda x, t: x)
    assert isinstance(wrapped, _WrappedModel)
    assert d._wrap_model(wrapped) is wrapped


def test_unspaced_diffusion_keeps_every_step():
    d = _spaced([1000])
    base = gd.GaussianDiffusion(
        betas=gd.get_named_beta_schedule("linear", 1000),
        model_mean_type=gd.ModelMeanType.EPSILON,
        model_var_type=gd.ModelVarType.FIXED_LARGE,
        loss_type=gd.LossType.MSE,
    )
    assert d.timestep_map == list(range(1000))
    np.testing.assert_allclose(d.betas, base.betas, rtol=1e-12)


# --------------------------------------------------------------------------------------------- log-SNR spacing


def _lambda(schedule, steps=1000):
    alphas_cumprod = np.cumprod(1.0 - gd.get_named_beta_schedule(schedule, steps))
    return 0.5 * np.log(alphas_cumprod / (1.0 - alphas_cumprod))


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("count", [2, 5, 10, 25, 50, 100, 250, 1000])
def test_logsnr_spacing_keeps_exactly_n_distinct_steps_from_the_last_to_zero(schedule, count):
    betas = gd.get_named_beta_schedule(schedule, 1000)
    steps = sorted(space_timesteps(1000, "logsnr%d" % count, betas=betas))
    assert len(steps) == count
    assert steps[0] == 0 and steps[-1] == 999


def test_logsnr_spacing_is_nearest_to_an_even_log_snr_grid():
    lam = _lambda("linear")
    steps = sorted(space_timesteps(1000, "logsnr10", betas=gd.get_named_beta_schedule("linear", 1000)))
    assert steps == [0, 5, 22, 73, 202, 410, 603, 757, 886, 999]
    targets = np.linspace(lam[0], lam[-1], 10)
    for t, target in zip(steps, targets):  # lambda is monotone: nearer than both neighbours is nearest
        for neighbour in (t - 1, t + 1):
            if 0 <= neighbour < 1000:
                assert abs(lam[t] - target) <= abs(lam[neighbour] - target)
    gaps = -np.diff(lam[steps])
    assert np.abs(gaps / gaps.mean() - 1).max() < 0.05
    uniform_gaps = -np.diff(lam[sorted(space_timesteps(1000, "10"))])
    assert uniform_gaps.max() / uniform_gaps.min() > 5  # what the log-SNR grid is for


def test_logsnr_spacing_resolves_shared_nearest_steps():
    # Linear schedule: lambda(0) - lambda(1) = 0.39 exceeds the grid step of logsnr100 (0.098), so the lowest
    # targets share timesteps 0-1 and are moved up one by one. Cosine: the clipped last beta leaves a gap of 3.5
    # below lambda(998), so the highest targets crowd into the last timesteps, one each.
    linear = sorted(space_timesteps(1000, "logsnr100", betas=gd.get_named_beta_schedule("linear", 1000)))
    assert linear[:8] == list(range(8)) and len(set(linear)) == 100
    cosine = sorted(space_timesteps(1000, "logsnr20", betas=gd.get_named_beta_schedule("cosine", 1000)))
    assert cosine[-5:] == [995, 996, 997, 998, 999] and len(set(cosine)) == 20


def test_logsnr_spacing_from_a_start_step_is_the_log_snr_grid_of_the_steps_up_to_it():
    # cosine: logsnr10 spends 4 of its 10 steps in 994..999 (lambda -5.4 to -9.9); from 990 they spread out
    betas = gd.get_named_beta_schedule("cosine", 1000)
    full = sorted(space_timesteps(1000, "logsnr10", betas=betas))
    assert full[-4:] == [994, 997, 998, 999]
    steps = sorted(space_timesteps(1000, "logsnr10@990", betas=betas))
    assert len(steps) == 10 and steps[0] == 0 and steps[-1] == 990
    assert steps == sorted(space_timesteps(991, "logsnr10", betas=betas[:991]))
    assert sorted(space_timesteps(1000, "logsnr10@999", betas=betas)) == full
    lam = _lambda("cosine")
    gaps = -np.diff(lam[steps])
    assert np.abs(gaps[2:] / gaps[2:].mean() - 1).max() < 0.05  # even in log-SNR (the lowest steps are integers)
    for bad in ("logsnr10@1000", "logsnr10@-1", "logsnr10@x", "logsnr10@", "logsnr20@5"):
        with pytest.raises(SpacingError, match="logsnr"):
            space_timesteps(1000, bad, betas=betas)


def test_logsnr_spacing_refuses_what_it_cannot_do_with_user_errors():
    betas = gd.get_named_beta_schedule("linear", 100)
    with pytest.raises(SpacingError):
        space_timesteps(100, "logsnr101", betas=betas)
    with pytest.raises(SpacingError):
        space_timesteps(100, "logsnr0", betas=betas)
    with pytest.raises(SpacingError):
        space_timesteps(100, "logsnr", betas=betas)
    with pytest.raises(SpacingError):
        space_timesteps(100, "logsnr10")  # the schedule is needed
    with pytest.raises(SpacingError):
        space_timesteps(1000, "logsnr10", betas=betas)  # betas of another length
    assert sorted(space_timesteps(100, "logsnr100", betas=betas)) == list(range(100))


def test_logsnr_spacing_through_the_diffusion_factories():
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "DiT"))
    from diffusion import create_diffusion

    from guided_diffusion.respace import logsnr_timesteps
    from guided_diffusion.script_util import create_gaussian_diffusion

    d = create_gaussian_diffusion(steps=1000, noise_schedule="cosine", timestep_respacing="logsnr12")
    assert d.timestep_map == logsnr_timesteps(gd.get_named_beta_schedule("cosine", 1000), 12)
    dit = create_diffusion("logsnr8")
    assert dit.timestep_map == logsnr_timesteps(gd.get_named_beta_schedule("linear", 1000), 8)


def test_every_sampler_walks_a_logsnr_spacing_on_original_timesteps():
    betas = gd.get_named_beta_schedule("linear", 1000)
    d = SpacedDiffusion(use_timesteps=space_timesteps(1000, "logsnr5", betas=betas), betas=betas,
                        model_mean_type=gd.ModelMeanType.EPSILON, model_var_type=gd.ModelVarType.FIXED_LARGE,
                        loss_type=gd.LossType.MSE)
    expected = [[t] for t in sorted(space_timesteps(1000, "logsnr5", betas=betas), reverse=True)]
    for loop in (d.p_sample_loop, d.ddim_sample_loop, d.dpm_solver_sample_loop):
        model = _RecordingModel()
        loop(model, (1, 3, 2, 2))
        assert [s.tolist() for s in model.seen] == expected, loop.__name__
