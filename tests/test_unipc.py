"""Tests for guided_diffusion.unipc: UniPC against diffusers' UniPCMultistepScheduler, against DDIM, its corrector
and its convergence on Gaussian data (whose diffusion ODE has an exact solution)."""

import json
import os

import guided_diffusion  # noqa: F401  (prepares Jittor's environment before jittor is imported)
import jittor as jt
import numpy as np
import pytest

from guided_diffusion import checkpoint, script_util, state_dicts
from guided_diffusion import gaussian_diffusion as gd
from guided_diffusion.dpm_solver import multistep_weights
from guided_diffusion.respace import SpacedDiffusion, space_timesteps
from guided_diffusion.unipc import corrector_weights, predictor_weights, unipc_orders
from gaussian_data_model import GaussianDataModel
from test_gaussian_diffusion import count_kernel_compiles

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
UNIPC_FIXTURE = os.path.join(FIXTURES, "unipc", "unipc_unet64_cond.npz")
LINEAR = gd.get_named_beta_schedule("linear", 1000)


def _spaced(use_timesteps, betas=LINEAR, mean=gd.ModelMeanType.EPSILON, var=gd.ModelVarType.FIXED_LARGE):
    return SpacedDiffusion(use_timesteps=use_timesteps, betas=betas, model_mean_type=mean, model_var_type=var,
                           loss_type=gd.LossType.MSE)


def _walk(diffusion, model, noise, order, variant="bh2", **kw):
    """Every step of a UniPC walk as numpy arrays: (samples, data predictions)."""
    steps = list(diffusion.unipc_sample_loop_progressive(model, list(noise.shape), noise=jt.array(noise),
                                                         order=order, variant=variant, **kw))
    return [s["sample"].numpy() for s in steps], [s["pred_xstart"].numpy() for s in steps]


# --------------------------------------------------------------------------------------------- diffusers parity


@pytest.fixture(scope="module")
def ref():
    return np.load(UNIPC_FIXTURE)


@pytest.fixture(scope="module")
def unet():
    with open(os.path.join(FIXTURES, "guided_diffusion", "unet64_cond_flags.json")) as f:
        flags = json.load(f)
    model, _ = script_util.create_model_and_diffusion(**flags)
    state_dicts.load_state_dict_strict(
        model, checkpoint.load_file(os.path.join(FIXTURES, "guided_diffusion", "unet64_cond.pt")))
    model.eval()
    return model


def test_orders_follow_diffusers_for_every_walk_length(ref):
    table = ref["orders_table"]  # [order - 1, steps - 1, step]: the predictor order diffusers 0.42.1 took
    for order in (1, 2, 3):
        for n in range(1, table.shape[1] + 1):
            assert unipc_orders(n, order) == table[order - 1, n - 1, :n].tolist(), (order, n)
    assert unipc_orders(10, 3) == [1, 2, 3, 3, 3, 3, 3, 3, 2, 1]
    with pytest.raises(ValueError):
        unipc_orders(10, 4)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("run", ["eps10", "x0_10"])
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("variant", ["bh1", "bh2"])
def test_walk_matches_diffusers_unipc_multistep(ref, unet, schedule, run, order, variant):
    # The fixture UNet learns its variance (6 channels): the walk must use the first 3 only. x0_* runs read those
    # 3 channels as an x_0 prediction (START_X), as diffusers' prediction_type="sample" did.
    prefix = "%s_%s" % (schedule, run)
    mean = gd.ModelMeanType.START_X if run.startswith("x0") else gd.ModelMeanType.EPSILON
    diffusion = _spaced(ref[prefix + "_timesteps"].tolist(), betas=ref[schedule + "_betas"], mean=mean,
                        var=gd.ModelVarType.LEARNED_RANGE)
    key = "%s_k%d_%s" % (prefix, order, variant)
    assert unipc_orders(diffusion.num_timesteps, order) == ref[key + "_orders"].tolist()
    y = jt.array(ref["y"].astype(np.int32))
    with jt.no_grad():
        samples, _ = _walk(diffusion, unet, ref["x_T"], order, variant, clip_denoised=False, model_kwargs={"y": y})
    expected = ref[key]
    assert len(samples) == len(expected)
    for i, (ours, theirs) in enumerate(zip(samples, expected)):
        assert np.isfinite(ours).all(), i
        if variant == "bh1" and i == len(expected) - 1:
            # diffusers' last bh1 step computes alpha_t * B(h) * 0 with B(h) = h = -inf: NaN. Ours is finite and,
            # at order 1, lands on the data prediction as bh2's last step does.
            assert np.isnan(theirs).all()
            continue
        err = float(np.abs(ours - theirs).max())
        assert err <= 1e-3 * max(1.0, float(np.abs(theirs).max())), (i, err)


def test_the_last_bh1_step_equals_the_last_bh2_step_from_the_same_point():
    walk = np.array([0.02, 0.3, 0.8, 1.0])
    np.testing.assert_array_equal(predictor_weights(walk, 2, 1, "bh1"), predictor_weights(walk, 2, 1, "bh2"))
    np.testing.assert_allclose(predictor_weights(walk, 2, 1, "bh1"), [0.0, 1.0], atol=1e-15)


def test_a_model_without_learned_variance_walks_the_same_path(ref, unet):
    # The same eps channels from a 3-channel model (FIXED_LARGE) give the same walk as the 6-channel one.
    diffusion = _spaced(ref["linear_eps10_timesteps"].tolist(), betas=ref["linear_betas"])
    y = jt.array(ref["y"].astype(np.int32))
    with jt.no_grad():
        samples, _ = _walk(diffusion, lambda x, t, **kw: unet(x, t, **kw)[:, :3], ref["x_T"], 2,
                           clip_denoised=False, model_kwargs={"y": y})
    theirs = ref["linear_eps10_k2_bh2"]
    for ours, t in zip(samples, theirs):
        assert np.abs(ours - t).max() <= 1e-3 * max(1.0, np.abs(t).max())


def test_fixture_tells_the_orders_and_variants_apart(ref):
    # Guards the parity test: walks of different orders or variants differ far beyond its tolerance.
    for schedule in ("linear", "cosine"):
        for run in ("eps10", "x0_10"):
            p = "%s_%s" % (schedule, run)
            for a, b in (("k1_bh2", "k2_bh2"), ("k2_bh2", "k3_bh2"), ("k2_bh1", "k2_bh2"), ("k3_bh1", "k3_bh2")):
                x, z = ref["%s_%s" % (p, a)][-2], ref["%s_%s" % (p, b)][-2]
                assert np.abs(x - z).max() > 10 * 1e-3 * max(1.0, np.abs(z).max()), (p, a, b)


# --------------------------------------------------------------------------------------------- weights


def test_order_one_predictor_is_ddim_and_dpm_solver_one():
    walk = np.array([0.02, 0.3, 0.8, 1.0])
    for step in range(3):
        for variant in ("bh1", "bh2"):
            np.testing.assert_allclose(predictor_weights(walk, step, 1, variant), multistep_weights(walk, step, 1),
                                       rtol=1e-12, atol=1e-15)


def _exact_step(walk, s, t, x_s, poly):
    # x_t = (sigma_t / sigma_s) x_s + sigma_t * integral of e^lambda D(lambda) from lambda_s to lambda_t.
    lam = 0.5 * np.log(walk / (1 - walk))
    u = np.linspace(lam[s], lam[t], 20001)
    f = np.exp(u) * np.polyval(poly, u)
    integral = np.sum((f[1:] + f[:-1]) * np.diff(u)) / 2
    return np.sqrt((1 - walk[t]) / (1 - walk[s])) * x_s + np.sqrt(1 - walk[t]) * integral, lam


def _predicted(walk, step, order, variant, poly, lam):
    w = predictor_weights(walk, step, order, variant)
    return w[0] * 1.3 + sum(w[j + 1] * np.polyval(poly, lam[step - j]) for j in range(order))


def _corrected(walk, step, order, variant, poly, lam):
    w = corrector_weights(walk, step + 1, order, variant)
    return w[0] * 1.3 + w[1] * np.polyval(poly, lam[step + 1]) + \
        sum(w[j + 2] * np.polyval(poly, lam[step - j]) for j in range(order))


@pytest.mark.parametrize("variant", ["bh1", "bh2"])
def test_predictor_and_corrector_integrate_polynomial_data_predictions(variant):
    # With the coefficients solved from the order conditions, UniP-3 integrates a D quadratic in lambda exactly and
    # UniC-p (which adds the prediction at the target) one of degree p; the simplified rho = 1/2 of UniP-2 and
    # UniC-1 is exact for constants only.
    walk = np.array([0.05, 0.2, 0.45, 0.7, 0.85])
    step = 3
    const, line, quad, cubic = [0.4], [-0.7, 0.3], [0.25, -0.7, 0.3], [0.5, 0.25, -0.7, 0.3]
    for fn, order, poly, exact_expected in (
        (_predicted, 1, const, True), (_predicted, 2, const, True), (_predicted, 2, line, False),
        (_predicted, 3, quad, True), (_predicted, 3, cubic, False),
        (_corrected, 1, const, True), (_corrected, 1, line, False), (_corrected, 2, quad, True),
        (_corrected, 2, cubic, False), (_corrected, 3, cubic, True),
    ):
        exact, lam = _exact_step(walk, step, step + 1, 1.3, poly)
        err = abs(fn(walk, step, order, variant, poly, lam) - exact)
        assert (err < 1e-8) == exact_expected, (fn.__name__, order, poly, err)


def test_weights_reject_impossible_steps():
    walk = np.array([0.1, 0.5, 0.9, 1.0])
    with pytest.raises(ValueError):
        predictor_weights(walk, 2, 2)  # order 2 into the clean image
    with pytest.raises(ValueError):
        predictor_weights(walk, 1, 3)  # order 3 with one earlier point
    with pytest.raises(ValueError):
        corrector_weights(walk, 0, 1)  # nothing to correct at the start
    with pytest.raises(ValueError):
        corrector_weights(walk, 1, 2)
    with pytest.raises(ValueError):
        predictor_weights(walk, 0, 1, "bh3")


# --------------------------------------------------------------------------------------------- options


def _stub_cond_fn(x, t, **kwargs):
    return -0.2 * x + 0.05


@pytest.mark.parametrize("order", [2, 3])
def test_clipping_denoised_fn_and_cond_fn_act_on_every_data_prediction(order):
    diffusion = _spaced(space_timesteps(1000, "6"))
    model = GaussianDataModel(LINEAR, mu=0.5, std=2.0)
    noise = np.random.RandomState(2).randn(1, 3, 4, 4).astype(np.float32)
    samples, preds = _walk(diffusion, model, noise, order, clip_denoised=True)
    assert all(np.abs(p).max() <= 1.0 for p in preds)
    np.testing.assert_allclose(samples[-1], preds[-1], rtol=1e-6)  # the last step lands on the data prediction
    _, fixed = _walk(diffusion, model, noise, order, clip_denoised=True, denoised_fn=lambda v: 0.0 * v + 0.25)
    np.testing.assert_allclose(np.stack(fixed), 0.25, rtol=1e-6)

    # cond_fn g shifts the noise prediction to eps - sqrt(1 - alpha_bar) g: a model with it built in walks alike.
    base = GaussianDataModel(LINEAR, mu=0.1, std=0.6)

    def shifted(x, t, **kwargs):
        return base(x, t) - gd._extract_into_tensor(np.sqrt(1.0 - base.alphas_cumprod), t, x.shape) * \
            _stub_cond_fn(x, t)

    guided, _ = _walk(diffusion, base, noise, order, clip_denoised=False, cond_fn=_stub_cond_fn)
    expected, _ = _walk(diffusion, shifted, noise, order, clip_denoised=False)
    for ours, theirs in zip(guided, expected):
        np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5)
    unguided, _ = _walk(diffusion, base, noise, order, clip_denoised=False)
    assert np.abs(guided[-1] - unguided[-1]).max() > 0.05


def test_final_sample_of_the_loop_is_the_last_step():
    diffusion = _spaced(space_timesteps(1000, "5"))
    model = GaussianDataModel(LINEAR, mu=0.2, std=0.7)
    noise = np.random.RandomState(7).randn(2, 3, 2, 2).astype(np.float32)
    samples, _ = _walk(diffusion, model, noise, 3, "bh1", clip_denoised=False)
    final = diffusion.unipc_sample_loop(model, list(noise.shape), noise=jt.array(noise), clip_denoised=False,
                                        order=3, variant="bh1")
    np.testing.assert_allclose(final.numpy(), samples[-1], rtol=1e-6)
    with pytest.raises(ValueError):
        diffusion.unipc_sample_loop(model, list(noise.shape), order=2, variant="bh3")


def test_walk_compiles_only_while_new_orders_appear():
    # Batch 1 (Jittor folds one-element arrays holding 0, 1 or 2 into kernels). Steps 0-3 bring the (corrector,
    # predictor) orders (-, 1), (1, 2), (2, 3), (3, 3); steps 4-6 repeat (3, 3) and must reuse their kernels; the
    # last two bring (3, 2) and (2, 1).
    diffusion = _spaced(space_timesteps(1000, "logsnr9", betas=LINEAR))
    noise = jt.array(np.random.RandomState(5).randn(1, 3, 4, 4).astype(np.float32))
    gen = diffusion.unipc_sample_loop_progressive(GaussianDataModel(LINEAR, std=0.8), [1, 3, 4, 4], noise=noise,
                                                  order=3, clip_denoised=True)
    counts = []
    while True:
        with count_kernel_compiles() as c:
            try:
                next(gen)
            except StopIteration:
                break
        counts.append(c["n"])
    assert len(counts) == 9
    assert counts[4:7] == [0] * 3, counts


# --------------------------------------------------------------------------------------------- convergence


def test_unipc_converges_faster_than_dpm_solver_on_gaussian_data():
    # The corrector raises the order at no extra model call. On the log-SNR grid with 20 and 40 steps UniPC-2
    # (bh2) is closer to the exact ODE solution than DPM-Solver++ 2M, and UniPC-3's error falls at least 8-fold
    # from 20 to 40 steps (order 3 or more; 2M's falls about 4-fold).
    model = GaussianDataModel(LINEAR, mu=0.3, std=0.5)
    noise = np.random.RandomState(0).randn(2, 3, 8, 8).astype(np.float32)
    exact = model.data_prediction(model.ode_solution(noise, 999, 0), 0)
    err = {}
    for n in (20, 40):
        diffusion = _spaced(space_timesteps(1000, "logsnr%d" % n, betas=LINEAR))
        kw = dict(noise=jt.array(noise), clip_denoised=False)
        for name, out in (("unipc2", diffusion.unipc_sample_loop(model, list(noise.shape), order=2, **kw)),
                          ("unipc3", diffusion.unipc_sample_loop(model, list(noise.shape), order=3, **kw)),
                          ("dpm2", diffusion.dpm_solver_sample_loop(model, list(noise.shape), order=2, **kw))):
            err[name, n] = float(np.sqrt(np.mean((out.numpy() - exact) ** 2)))
    for n in (20, 40):
        assert err["unipc2", n] < err["dpm2", n], err
    assert err["unipc3", 20] / err["unipc3", 40] >= 8.0, err
    assert err["dpm2", 20] / err["dpm2", 40] < 5.0, err
