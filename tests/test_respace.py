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
