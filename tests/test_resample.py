"""Tests for guided_diffusion.resample: timestep samplers used by training."""

import guided_diffusion  # noqa: F401  (prepares Jittor's environment before jittor is imported)
import jittor as jt
import numpy as np
import pytest

from guided_diffusion.errors import UserError
from guided_diffusion.resample import (
    LossSecondMomentResampler,
    UniformSampler,
    create_named_schedule_sampler,
)


class _Diffusion:
    def __init__(self, num_timesteps):
        self.num_timesteps = num_timesteps


def test_named_samplers_are_created_and_unknown_names_raise_user_error():
    d = _Diffusion(10)
    assert isinstance(create_named_schedule_sampler("uniform", d), UniformSampler)
    assert isinstance(create_named_schedule_sampler("loss-second-moment", d), LossSecondMomentResampler)
    with pytest.raises(UserError):
        create_named_schedule_sampler("bogus", d)
    with pytest.raises(NotImplementedError):
        create_named_schedule_sampler("bogus", d)


def test_uniform_sampler_draws_with_numpy_global_rng_and_returns_vars():
    sampler = UniformSampler(_Diffusion(50))
    np.random.seed(123)
    t, w = sampler.sample(8, "cpu")
    np.random.seed(123)
    expected = np.random.choice(50, size=(8,), p=np.ones(50) / 50)
    assert isinstance(t, jt.Var) and isinstance(w, jt.Var)
    assert t.dtype == "int32" and w.dtype == "float32"
    assert t.numpy().tolist() == expected.tolist()
    np.testing.assert_allclose(w.numpy(), np.ones(8))


def test_loss_second_moment_sampler_is_uniform_until_every_step_has_full_history():
    sampler = LossSecondMomentResampler(_Diffusion(3), history_per_term=2)
    assert sampler._loss_counts.dtype.kind == "i"
    sampler.update_with_all_losses([0, 0, 1, 1], [1.0, 2.0, 3.0, 4.0])
    np.testing.assert_array_equal(sampler.weights(), np.ones(3))
    sampler.update_with_all_losses([2, 2], [5.0, 6.0])
    w = sampler.weights()
    rms = np.sqrt(np.array([(1 + 4) / 2, (9 + 16) / 2, (25 + 36) / 2]))
    expected = rms / rms.sum() * (1 - 0.001) + 0.001 / 3
    np.testing.assert_allclose(w, expected, rtol=1e-12)


def test_loss_second_moment_sampler_shifts_out_the_oldest_loss():
    sampler = LossSecondMomentResampler(_Diffusion(2), history_per_term=3)
    sampler.update_with_all_losses([1] * 5, [1.0, 2.0, 3.0, 4.0, 5.0])
    np.testing.assert_array_equal(sampler._loss_history[1], [3.0, 4.0, 5.0])
    assert sampler._loss_counts.tolist() == [0, 3]


def test_update_with_local_losses_accepts_vars_in_a_single_process():
    sampler = LossSecondMomentResampler(_Diffusion(2), history_per_term=1)
    sampler.update_with_local_losses(
        jt.array(np.array([0, 1], dtype=np.int32)), jt.array(np.array([2.0, 4.0], dtype=np.float32))
    )
    np.testing.assert_allclose(sampler._loss_history[:, 0], [2.0, 4.0])
    np.testing.assert_allclose(sampler.weights(), np.array([1 / 3, 2 / 3]) * 0.999 + 0.0005, rtol=1e-12)


def test_importance_weights_undo_the_sampling_bias():
    sampler = LossSecondMomentResampler(_Diffusion(2), history_per_term=1, uniform_prob=0.0)
    sampler.update_with_all_losses([0, 1], [1.0, 3.0])
    np.random.seed(0)
    t, w = sampler.sample(16, None)
    t, w = t.numpy(), w.numpy()
    p = np.array([0.25, 0.75])
    np.testing.assert_allclose(w, 1 / (2 * p[t]), rtol=1e-6)
