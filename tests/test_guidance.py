"""Tests for guided_diffusion.guidance: classifier guidance (per-sample label gradients) and classifier-free
guidance, including parity with the reference's classifier-guided DDIM sampling."""

import json
import os

import guided_diffusion  # noqa: F401  (prepares Jittor's environment before jittor is imported)
import jittor as jt
import numpy as np
import pytest

from guided_diffusion import checkpoint, script_util, state_dicts
from guided_diffusion.errors import UserError
from guided_diffusion.guidance import (ClassifierFreeGuidance, classifier_cond_fn, guided_output,
                                      parse_guidance_interval, rescale_noise_cfg)
from guided_diffusion.unet import EncoderUNetModel

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "guided_diffusion")


def _tol(ref, factor=1e-4):
    return factor * max(1.0, float(np.abs(ref).max()))


def _max_err(ours, ref):
    return float(np.abs(ours.numpy() - ref).max())


class _LinearClassifier:
    """logits = flatten(x) @ W + t * b: small enough to differentiate by hand."""

    def __init__(self, w, b):
        self.w, self.b = jt.array(w), jt.array(b)
        self.seen_t = None

    def __call__(self, x, t):
        self.seen_t = t.numpy().copy()
        return jt.matmul(x.reshape(x.shape[0], -1), self.w) + t.float32().reshape(-1, 1) * self.b


def test_classifier_cond_fn_gives_each_sample_the_gradient_of_its_own_label():
    rng = np.random.RandomState(0)
    x = rng.randn(3, 2, 2, 2).astype(np.float32)
    w = rng.randn(8, 5).astype(np.float32)
    b = (0.01 * rng.randn(5)).astype(np.float32)
    labels = np.array([4, 0, 2])
    t = np.array([10, 500, 999])
    clf = _LinearClassifier(w, b)
    grad = classifier_cond_fn(clf, 2.5)(jt.array(x), jt.array(t.astype(np.int32)), y=jt.array(labels.astype(np.int32)))

    logits = x.reshape(3, -1) @ w + t.reshape(-1, 1) * b
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    expected = ((np.eye(5)[labels] - p) @ w.T).reshape(x.shape) * 2.5
    np.testing.assert_allclose(grad.numpy(), expected, rtol=1e-4, atol=1e-5)
    assert clf.seen_t.tolist() == t.tolist()
    # A different label for one sample changes only that sample's gradient.
    grad2 = classifier_cond_fn(clf, 2.5)(jt.array(x), jt.array(t.astype(np.int32)),
                                         y=jt.array(np.array([4, 1, 2], dtype=np.int32))).numpy()
    np.testing.assert_allclose(grad2[[0, 2]], grad.numpy()[[0, 2]], rtol=1e-6)
    assert np.abs(grad2[1] - grad.numpy()[1]).max() > 1e-3


def test_classifier_cond_fn_works_inside_no_grad_and_requires_labels():
    clf = _LinearClassifier(np.ones((4, 3), np.float32), np.zeros(3, np.float32))
    cond_fn = classifier_cond_fn(clf, 1.0)
    with jt.no_grad():
        x = jt.ones((2, 1, 2, 2))
        g = cond_fn(x, jt.array(np.array([1, 2], dtype=np.int32)), y=np.array([0, 1]))
    np.testing.assert_allclose(g.numpy(), 0.0, atol=1e-6)  # equal logits: the gradient of log softmax is 0
    with pytest.raises(AssertionError):
        cond_fn(x, jt.array(np.array([1, 2], dtype=np.int32)))


class _EpsModel:
    """out = [a*x + c*y (eps) | v*x (variance values)]: records the labels it was called with."""

    def __init__(self, a, c, v=None):
        self.a, self.c, self.v = a, c, v
        self.seen_y = []

    def __call__(self, x, t, y=None, **kwargs):
        self.seen_y.append(None if y is None else y.numpy().tolist())
        shift = 0.0 if y is None else y.float32().reshape(-1, 1, 1, 1) * self.c
        eps = self.a * x + shift + kwargs.get("bias", 0.0)
        if self.v is None:
            return eps
        return jt.concat([eps, self.v * x], dim=1)


def test_classifier_free_guidance_with_two_models_guides_eps_and_keeps_conditional_variance():
    x_np = np.random.RandomState(1).randn(2, 3, 2, 2).astype(np.float32)
    y = np.array([1, 3], dtype=np.int32)
    cond, uncond = _EpsModel(1.0, 0.5, v=0.1), _EpsModel(2.0, 0.0, v=0.9)
    cfg = ClassifierFreeGuidance(cond, 3.0, uncond_model=uncond)
    out = cfg(jt.array(x_np), jt.array(np.array([5, 5], dtype=np.int32)), y=jt.array(y)).numpy()
    eps_c = x_np + 0.5 * y.reshape(-1, 1, 1, 1)
    eps_u = 2.0 * x_np
    np.testing.assert_allclose(out[:, :3], 4.0 * eps_c - 3.0 * eps_u, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out[:, 3:], 0.1 * x_np, rtol=1e-6)
    assert uncond.seen_y == [None] and cond.seen_y == [[1, 3]]


def test_classifier_free_guidance_with_null_label_uses_label_num_classes_for_the_unconditional_pass():
    x_np = np.random.RandomState(2).randn(2, 3, 2, 2).astype(np.float32)
    model = _EpsModel(1.0, 0.25)
    cfg = ClassifierFreeGuidance(model, 1.5, null_label=10)
    out = cfg(jt.array(x_np), jt.array(np.array([7, 7], dtype=np.int32)), y=jt.array(np.array([2, 9], np.int32)),
              bias=0.5).numpy()
    assert model.seen_y == [[2, 9, 10, 10]]
    eps_c = x_np + 0.25 * np.array([2, 9]).reshape(-1, 1, 1, 1) + 0.5
    eps_u = x_np + 0.25 * 10 + 0.5
    np.testing.assert_allclose(out, 2.5 * eps_c - 1.5 * eps_u, rtol=1e-5, atol=1e-5)


def test_zero_guidance_scale_returns_the_conditional_output_and_bad_modes_are_rejected():
    cond = jt.array(np.arange(12, dtype=np.float32).reshape(1, 6, 1, 2))
    np.testing.assert_allclose(guided_output(cond, cond * 5, 0.0, 3).numpy(), cond.numpy())
    with pytest.raises(ValueError):
        ClassifierFreeGuidance(lambda *a, **k: None, 1.0)
    with pytest.raises(ValueError):
        ClassifierFreeGuidance(lambda *a, **k: None, 1.0, uncond_model=lambda *a, **k: None, null_label=3)


# --------------------------------------------------------------------------------------------- reference fixture


@pytest.fixture(scope="module")
def guided_setup():
    ref = np.load(os.path.join(FIXTURES, "diffusion_unet64_cond.npz"))
    with open(os.path.join(FIXTURES, "classifier64_attention_kwargs.json")) as f:
        classifier = EncoderUNetModel(**json.load(f))
    state_dicts.load_state_dict_strict(
        classifier, checkpoint.load_file(os.path.join(FIXTURES, "classifier64_attention.pt"))
    )
    classifier.eval()
    diffusion = script_util.create_gaussian_diffusion(steps=1000, learn_sigma=True, timestep_respacing="ddim10")
    return ref, classifier, diffusion


def _fixture_p_mean_var(ref):
    return {k: jt.array(ref["pmv_" + k]) for k in ("mean", "variance", "log_variance", "pred_xstart")}


def test_condition_mean_and_score_with_per_sample_classifier_gradient_match_reference(guided_setup):
    ref, classifier, diffusion = guided_setup
    assert len(set(ref["cond_y"].tolist())) == 2  # the two samples have different labels
    cond_fn = classifier_cond_fn(classifier, float(ref["cond_step_scale"]))
    kwargs = {"y": jt.array(ref["cond_y"].astype(np.int32))}
    x = jt.array(ref["x_t"])
    t = jt.array(ref["t_spaced"].astype(np.int32))
    mean = diffusion.condition_mean(cond_fn, _fixture_p_mean_var(ref), x, t, model_kwargs=kwargs)
    assert _max_err(mean, ref["cond_mean"]) <= _tol(ref["cond_mean"])
    out = diffusion.condition_score(cond_fn, _fixture_p_mean_var(ref), x, t, model_kwargs=kwargs)
    assert _max_err(out["mean"], ref["cond_score_mean"]) <= _tol(ref["cond_score_mean"])
    assert _max_err(out["pred_xstart"], ref["cond_score_pred_xstart"]) <= _tol(ref["cond_score_pred_xstart"])


def test_classifier_guided_ddim10_sample_matches_reference(guided_setup):
    ref, classifier, diffusion = guided_setup
    with open(os.path.join(FIXTURES, "unet64_cond_flags.json")) as f:
        flags = json.load(f)
    model, _ = script_util.create_model_and_diffusion(**flags)
    state_dicts.load_state_dict_strict(model, checkpoint.load_file(os.path.join(FIXTURES, "unet64_cond.pt")))
    model.eval()

    def model_fn(x, t, y=None):  # as in classifier_sample.py
        return model(x, t, y if flags["class_cond"] else None)

    sample = diffusion.ddim_sample_loop(
        model_fn,
        (2, 3, 64, 64),
        noise=jt.array(ref["x_T"]),
        clip_denoised=True,
        model_kwargs={"y": jt.array(ref["cond_y"].astype(np.int32))},
        cond_fn=classifier_cond_fn(classifier, float(ref["classifier_scale"])),
    )
    assert _max_err(sample, ref["ddim10_guided_sample"]) <= _tol(ref["ddim10_guided_sample"], 1e-3)


# --------------------------------------------------------------------------------------------- interval and rescale


def _t(values):
    return jt.array(np.array(values, dtype=np.int32))


def test_rescale_noise_cfg_equals_diffusers():
    ref = np.load(os.path.join(os.path.dirname(FIXTURES), "unipc", "unipc_unet64_cond.npz"))
    cond, cfg = jt.array(ref["rescale_cond"]), jt.array(ref["rescale_cfg"])
    for phi, expected in zip(ref["rescale_phis"], ref["rescale_out"]):
        ours = rescale_noise_cfg(cfg, cond, float(phi)).numpy()
        np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    # phi = 1: the guided prediction takes the conditional one's standard deviation, sample by sample.
    full = rescale_noise_cfg(cfg, cond, 1.0).numpy()
    np.testing.assert_allclose(full.reshape(3, -1).std(axis=1, ddof=1), ref["rescale_cond"].reshape(3, -1).std(
        axis=1, ddof=1), rtol=1e-5)


def test_guidance_rescale_acts_on_the_guided_eps_only():
    x_np = np.random.RandomState(3).randn(2, 3, 2, 2).astype(np.float32)
    cond, uncond = _EpsModel(1.0, 0.5, v=0.1), _EpsModel(2.0, 0.0, v=0.9)
    t, y = _t([5, 5]), jt.array(np.array([1, 3], dtype=np.int32))
    plain = ClassifierFreeGuidance(cond, 3.0, uncond_model=uncond)(jt.array(x_np), t, y=y).numpy()
    half = ClassifierFreeGuidance(cond, 3.0, uncond_model=uncond, rescale=0.5)(jt.array(x_np), t, y=y).numpy()
    eps_c = x_np + 0.5 * np.array([1, 3]).reshape(-1, 1, 1, 1)
    std = lambda a: a.reshape(2, -1).std(axis=1, ddof=1).reshape(-1, 1, 1, 1)  # noqa: E731
    expected = 0.5 * plain[:, :3] * std(eps_c) / std(plain[:, :3]) + 0.5 * plain[:, :3]
    np.testing.assert_allclose(half[:, :3], expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(half[:, 3:], plain[:, 3:])
    assert np.abs(half[:, :3] - plain[:, :3]).max() > 0.1


def test_guidance_interval_is_inclusive_and_outside_it_the_conditional_model_runs_alone():
    x_np = np.random.RandomState(4).randn(2, 3, 2, 2).astype(np.float32)
    model = _EpsModel(1.0, 0.25)
    cfg = ClassifierFreeGuidance(model, 2.0, null_label=10, interval=(100, 400))
    y = jt.array(np.array([2, 9], np.int32))
    for t, guided in ((99, False), (100, True), (400, True), (401, False)):
        model.seen_y = []
        out = cfg(jt.array(x_np), _t([t, t]), y=y).numpy()
        eps_c = x_np + 0.25 * np.array([2, 9]).reshape(-1, 1, 1, 1)
        expected = 3.0 * eps_c - 2.0 * (x_np + 2.5) if guided else eps_c
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
        assert model.seen_y == ([[2, 9, 10, 10]] if guided else [[2, 9]]), t
    # A batch mixing timesteps in and out of the interval: each sample by its own timestep.
    out = cfg(jt.array(x_np), _t([50, 200]), y=y).numpy()
    eps_c = x_np + 0.25 * np.array([2, 9]).reshape(-1, 1, 1, 1)
    np.testing.assert_allclose(out[0], eps_c[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out[1], 3.0 * eps_c[1] - 2.0 * (x_np[1] + 2.5), rtol=1e-5, atol=1e-5)


def test_classifier_guidance_interval_zeroes_the_gradient_outside_and_skips_the_classifier():
    rng = np.random.RandomState(5)
    clf = _LinearClassifier(rng.randn(12, 4).astype(np.float32), rng.randn(4).astype(np.float32))
    x = jt.array(rng.randn(2, 3, 2, 2).astype(np.float32))
    y = jt.array(np.array([0, 3], np.int32))
    full = classifier_cond_fn(clf, 2.0)(x, _t([300, 300]), y=y).numpy()
    limited = classifier_cond_fn(clf, 2.0, interval=(0, 300))
    np.testing.assert_allclose(limited(x, _t([300, 300]), y=y).numpy(), full, rtol=1e-6)
    clf.seen_t = None
    assert np.abs(limited(x, _t([301, 301]), y=y).numpy()).max() == 0.0 and clf.seen_t is None
    mixed = limited(x, _t([300, 900]), y=y).numpy()
    np.testing.assert_allclose(mixed[0], full[0], rtol=1e-6)
    assert np.abs(mixed[1]).max() == 0.0
    # Timesteps scaled for a --rescale_timesteps model (T = 4000: the model sees t * 0.25) map back.
    scaled = classifier_cond_fn(clf, 2.0, interval=(0, 1000), timestep_scale=0.25)
    tt = jt.array(np.array([1000 * 0.25, 1001 * 0.25], np.float32))
    assert np.abs(scaled(x, tt, y=y).numpy()[1]).max() == 0.0 and np.abs(scaled(x, tt, y=y).numpy()[0]).max() > 0


def test_parse_guidance_interval_names_the_fix():
    assert parse_guidance_interval("") is None
    assert parse_guidance_interval(" 0,700 ") == (0, 700)
    for bad in ("700", "a,b", "700,100", "0,1000", "-1,5"):
        with pytest.raises(UserError, match="--guidance_interval"):
            parse_guidance_interval(bad)
