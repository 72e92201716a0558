"""DiT diffusion/__init__.py: create_diffusion's settings and parity of losses and the CFG DDIM loop."""

import json
import os
import sys

import numpy as np
import pytest

import guided_diffusion  # noqa: F401  (prepares Jittor before it is imported)
import jittor as jt

from guided_diffusion import gaussian_diffusion as gd
from guided_diffusion.checkpoint import load_file
from guided_diffusion.state_dicts import load_state_dict_strict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "DiT"))
FIX = os.path.join(ROOT, "tests", "fixtures", "dit")

from diffusion import create_diffusion  # noqa: E402
from models import DiT  # noqa: E402


def _tol(ref, rel):
    return rel * max(1.0, float(np.abs(ref).max()))


@pytest.fixture(scope="module")
def ref():
    return dict(np.load(os.path.join(FIX, "dit_tiny_p4.npz")))


@pytest.fixture(scope="module")
def tiny():
    with open(os.path.join(FIX, "dit_tiny_p4_kwargs.json")) as f:
        model = DiT(**json.load(f))
    load_state_dict_strict(model, load_file(os.path.join(FIX, "dit_tiny_p4.pt")), source="dit_tiny_p4.pt")
    model.eval()
    return model


def test_create_diffusion_defaults_follow_dit():
    d = create_diffusion("")
    assert d.num_timesteps == 1000
    assert d.model_var_type == gd.ModelVarType.LEARNED_RANGE
    assert d.model_mean_type == gd.ModelMeanType.EPSILON
    assert d.loss_type == gd.LossType.MSE
    assert not getattr(d, "rescale_timesteps", False)
    np.testing.assert_allclose(d.betas[[0, 1, 999]], [1.0e-4, 1.1991991991991993e-4, 0.02], rtol=1e-12)
    assert create_diffusion(None).num_timesteps == 1000


def test_create_diffusion_respacing_and_options():
    d = create_diffusion("250")
    assert d.num_timesteps == 250
    np.testing.assert_allclose(d.betas[[0, 1, 249]], [9.999999999998899e-5, 5.990655644756426e-4,
                                                      0.07751934499235003], rtol=1e-10)
    assert create_diffusion("ddim8").num_timesteps == 8
    d = create_diffusion("", learn_sigma=False, sigma_small=True, predict_xstart=True, use_kl=True)
    assert d.model_var_type == gd.ModelVarType.FIXED_SMALL
    assert d.model_mean_type == gd.ModelMeanType.START_X
    assert d.loss_type == gd.LossType.RESCALED_KL
    assert create_diffusion("", learn_sigma=False).model_var_type == gd.ModelVarType.FIXED_LARGE
    assert create_diffusion("", rescale_learned_sigmas=True).loss_type == gd.LossType.RESCALED_MSE


def test_squaredcos_cap_v2_schedule_is_accepted():
    d = create_diffusion("", noise_schedule="squaredcos_cap_v2")
    np.testing.assert_allclose(d.betas[[0, 1, 998, 999]],
                               [4.128422482196914e-5, 4.614175273665033e-5, 0.7499993929011166, 0.999], rtol=1e-9)


def test_training_losses_match_reference_fixture(tiny, ref):
    d = create_diffusion("")
    out = d.training_losses(tiny, jt.array(ref["loss_x_start"]), jt.array(ref["loss_t"].astype(np.int32)),
                            dict(y=jt.array(np.array([1, 2], dtype=np.int32))), noise=jt.array(ref["loss_noise"]))
    for key in ("loss", "mse", "vb"):
        got = out[key].numpy()
        assert np.abs(got - ref["loss_" + key]).max() <= _tol(ref["loss_" + key], 1e-4), key


def test_ddim8_cfg_sample_matches_reference_fixture(tiny, ref):
    d = create_diffusion("ddim8")
    z = jt.array(ref["ddim_zT"])
    z = jt.concat([z, z], dim=0)
    y = jt.array(np.array([207, 1000], dtype=np.int32))
    sample = d.ddim_sample_loop(tiny.forward_with_cfg, tuple(z.shape), noise=z, clip_denoised=False,
                                model_kwargs=dict(y=y, cfg_scale=4.0))
    got = sample.numpy()[:1]
    assert np.abs(got - ref["ddim8_cfg_sample"]).max() <= _tol(ref["ddim8_cfg_sample"], 1e-3)


def test_training_loss_gradients_are_finite(tiny):
    # The vb term's unselected branches must not leak NaN gradients into the model (latents are unbounded).
    jt.set_global_seed(0)
    tiny.train()
    try:
        d = create_diffusion("")
        x = jt.randn(2, 4, 16, 16) * 3.0
        t = jt.array(np.array([0, 500], dtype=np.int32))
        loss = d.training_losses(tiny, x, t, dict(y=jt.array(np.array([1, 2], dtype=np.int32))))["loss"].mean()
        params = [p for p in tiny.parameters() if not p.is_stop_grad()]
        grads = jt.grad(loss, params)
        assert all(np.isfinite(g.numpy()).all() for g in grads)
        assert any(np.abs(g.numpy()).max() > 0 for g in grads)
    finally:
        tiny.eval()
