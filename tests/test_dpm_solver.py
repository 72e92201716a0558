"""Tests for guided_diffusion.dpm_solver: DPM-Solver++ multistep sampling against diffusers, against DDIM, and its
convergence order on Gaussian data (whose diffusion ODE has an exact solution)."""

import json
import os

import guided_diffusion  # noqa: F401  (prepares Jittor's environment before jittor is imported)
import jittor as jt
import numpy as np
import pytest

from guided_diffusion import checkpoint, script_util, state_dicts
from guided_diffusion import gaussian_diffusion as gd
from guided_diffusion.dpm_solver import multistep_weights, solver_orders
from gaussian_data_model import GaussianDataModel
from guided_diffusion.respace import SpacedDiffusion, space_timesteps
from test_gaussian_diffusion import count_kernel_compiles

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
DPM_FIXTURE = os.path.join(FIXTURES, "dpm_solver", "dpm_solver_unet64_cond.npz")
LINEAR = gd.get_named_beta_schedule("linear", 1000)


def _spaced(use_timesteps, betas=LINEAR, mean=gd.ModelMeanType.EPSILON, var=gd.ModelVarType.FIXED_LARGE):
    return SpacedDiffusion(use_timesteps=use_timesteps, betas=betas, model_mean_type=mean, model_var_type=var,
                           loss_type=gd.LossType.MSE)


def _walk(diffusion, model, noise, order, **kw):
    """Every step of a DPM-Solver++ walk as numpy arrays: (samples, data predictions)."""
    steps = list(diffusion.dpm_solver_sample_loop_progressive(model, list(noise.shape), noise=jt.array(noise),
                                                              order=order, **kw))
    return [s["sample"].numpy() for s in steps], [s["pred_xstart"].numpy() for s in steps]


def _rmse(a, b):
    return float(np.sqrt(np.mean((np.asarray(a, np.float64) - b) ** 2)))


# --------------------------------------------------------------------------------------------- diffusers parity


@pytest.fixture(scope="module")
def ref():
    return np.load(DPM_FIXTURE)


@pytest.fixture(scope="module")
def unet():
    with open(os.path.join(FIXTURES, "guided_diffusion", "unet64_cond_flags.json")) as f:
        flags = json.load(f)
    model, _ = script_util.create_model_and_diffusion(**flags)
    state_dicts.load_state_dict_strict(
        model, checkpoint.load_file(os.path.join(FIXTURES, "guided_diffusion", "unet64_cond.pt")))
    model.eval()
    return model


def test_solver_orders_follow_diffusers_for_every_walk_length(ref):
    table = ref["orders_table"]  # [order - 1, steps - 1, step] as diffusers 0.42.1 chose them
    for order in (1, 2, 3):
        for n in range(1, table.shape[1] + 1):
            assert solver_orders(n, order) == table[order - 1, n - 1, :n].tolist(), (order, n)
    # The rules the table holds: warm-up, order 1 last, the second-to-last lowered only below 15 steps.
    assert solver_orders(10, 3) == [1, 2, 3, 3, 3, 3, 3, 3, 2, 1]
    assert solver_orders(15, 3) == [1, 2] + [3] * 12 + [1]
    with pytest.raises(ValueError):
        solver_orders(10, 4)


@pytest.mark.parametrize("run,order", [("eps10", 1), ("eps10", 2), ("eps10", 3), ("x0_10", 1), ("x0_10", 2),
                                       ("x0_10", 3), ("eps16", 3)])
def test_walk_matches_diffusers_dpmsolver_multistep(ref, unet, run, order):
    # The fixture UNet learns its variance (6 channels): the solver must use the first 3 only. x0_* runs read
    # those 3 channels as an x_0 prediction (START_X), as diffusers' prediction_type="sample" did.
    mean = gd.ModelMeanType.START_X if run.startswith("x0") else gd.ModelMeanType.EPSILON
    diffusion = _spaced(ref[run + "_timesteps"].tolist(), betas=ref["betas"], mean=mean,
                        var=gd.ModelVarType.LEARNED_RANGE)
    assert solver_orders(diffusion.num_timesteps, order) == ref["%s_k%d_orders" % (run, order)].tolist()
    y = jt.array(ref["y"].astype(np.int32))
    with jt.no_grad():
        samples, _ = _walk(diffusion, unet, ref["x_T"], order, clip_denoised=False, model_kwargs={"y": y})
    expected = ref["%s_k%d" % (run, order)]
    assert len(samples) == len(expected)
    for i, (ours, theirs) in enumerate(zip(samples, expected)):
        err = float(np.abs(ours - theirs).max())
        assert err <= 1e-3 * max(1.0, float(np.abs(theirs).max())), (i, err)


def test_fixture_tells_the_orders_apart(ref):
    # Guards the parity test: the walks of different orders differ far beyond its tolerance.
    for run in ("eps10", "x0_10"):
        for low, high in ((1, 2), (2, 3)):
            a, b = ref["%s_k%d" % (run, low)][-1], ref["%s_k%d" % (run, high)][-1]
            assert np.abs(a - b).max() > 10 * 1e-3 * max(1.0, np.abs(b).max()), (run, low, high)


# --------------------------------------------------------------------------------------------- DDIM and options


def _stub_cond_fn(x, t, **kwargs):
    return -0.2 * x + 0.05


def test_order_one_is_ddim_with_clipping_denoised_fn_and_cond_fn():
    diffusion = _spaced(space_timesteps(1000, "8"))
    model = GaussianDataModel(LINEAR, mu=0.3, std=1.5)  # std 1.5: many x_0 predictions need clipping
    noise = np.random.RandomState(1).randn(2, 3, 4, 4).astype(np.float32)
    kw = dict(clip_denoised=True, denoised_fn=lambda v: 0.9 * v + 0.02, cond_fn=_stub_cond_fn)
    samples, preds = _walk(diffusion, model, noise, 1, **kw)
    ddim = list(diffusion.ddim_sample_loop_progressive(model, list(noise.shape), noise=jt.array(noise), eta=0.0,
                                                       **kw))
    assert len(samples) == len(ddim) == 8
    for ours, pred, theirs in zip(samples, preds, ddim):
        np.testing.assert_allclose(ours, theirs["sample"].numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(pred, theirs["pred_xstart"].numpy(), rtol=1e-5, atol=1e-5)
    final = diffusion.dpm_solver_sample_loop(model, list(noise.shape), noise=jt.array(noise), order=1, **kw)
    np.testing.assert_allclose(final.numpy(), samples[-1], rtol=1e-6)


@pytest.mark.parametrize("order", [2, 3])
def test_clip_denoised_clamps_every_data_prediction(order):
    diffusion = _spaced(space_timesteps(1000, "6"))
    model = GaussianDataModel(LINEAR, mu=0.5, std=2.0)
    noise = np.random.RandomState(2).randn(1, 3, 4, 4).astype(np.float32)
    samples, preds = _walk(diffusion, model, noise, order, clip_denoised=True)
    assert all(np.abs(p).max() <= 1.0 for p in preds)
    np.testing.assert_allclose(samples[-1], preds[-1], rtol=1e-6)  # the last step lands on the data prediction
    free, free_preds = _walk(diffusion, model, noise, order, clip_denoised=False)
    assert np.abs(free_preds[-1]).max() > 1.5  # without clipping this walk leaves [-1, 1]
    assert np.abs(free[-1] - samples[-1]).max() > 0.1


@pytest.mark.parametrize("order", [1, 2, 3])
def test_denoised_fn_sets_the_data_predictions_and_the_clean_image(order):
    diffusion = _spaced(space_timesteps(1000, "5"))
    noise = np.random.RandomState(3).randn(2, 3, 2, 2).astype(np.float32)
    samples, preds = _walk(diffusion, GaussianDataModel(LINEAR), noise, order, clip_denoised=True,
                           denoised_fn=lambda v: 0.0 * v + 0.25)
    np.testing.assert_allclose(np.stack(preds), 0.25, rtol=1e-6)
    np.testing.assert_allclose(samples[-1], 0.25, rtol=1e-5)


@pytest.mark.parametrize("order", [2, 3])
def test_cond_fn_guides_through_the_score(order):
    # cond_fn g shifts the noise prediction to eps - sqrt(1 - alpha_bar) g: a model with that shift built in
    # must walk the same path.
    base = GaussianDataModel(LINEAR, mu=0.1, std=0.6)

    def shifted(x, t, **kwargs):
        return base(x, t) - gd._extract_into_tensor(np.sqrt(1.0 - base.alphas_cumprod), t, x.shape) * \
            _stub_cond_fn(x, t)

    diffusion = _spaced(space_timesteps(1000, "7"))
    noise = np.random.RandomState(4).randn(2, 3, 4, 4).astype(np.float32)
    guided, _ = _walk(diffusion, base, noise, order, clip_denoised=False, cond_fn=_stub_cond_fn)
    expected, _ = _walk(diffusion, shifted, noise, order, clip_denoised=False)
    unguided, _ = _walk(diffusion, base, noise, order, clip_denoised=False)
    for ours, theirs in zip(guided, expected):
        np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5)
    assert np.abs(guided[-1] - unguided[-1]).max() > 0.05


def test_walk_compiles_only_while_new_orders_appear():
    # Batch 1 is the hard case (Jittor folds one-element arrays holding 0, 1 or 2 into kernels): steps 0-2 bring
    # orders 1, 2, 3; every later step (orders 3, 2, 1 again) must reuse their kernels.
    diffusion = _spaced(space_timesteps(1000, "logsnr9", betas=LINEAR))
    noise = jt.array(np.random.RandomState(5).randn(1, 3, 4, 4).astype(np.float32))
    gen = diffusion.dpm_solver_sample_loop_progressive(GaussianDataModel(LINEAR, std=0.8), [1, 3, 4, 4],
                                                       noise=noise, order=3, clip_denoised=True)
    counts = []
    while True:
        with count_kernel_compiles() as c:
            try:
                next(gen)
            except StopIteration:
                break
        counts.append(c["n"])
    assert len(counts) == 9
    assert counts[3:] == [0] * 6, counts


def test_walk_rejects_a_bad_order_and_impossible_steps():
    diffusion = _spaced(space_timesteps(1000, "3"))
    with pytest.raises(ValueError):
        diffusion.dpm_solver_sample_loop(GaussianDataModel(LINEAR), [1, 1, 2, 2], order=4)
    with pytest.raises(ValueError):
        multistep_weights(np.array([0.1, 0.5, 1.0]), 1, 2)  # order 2 into the clean image
    with pytest.raises(ValueError):
        multistep_weights(np.array([0.1, 0.5, 0.9, 1.0]), 1, 3)  # order 3 with one earlier point


# --------------------------------------------------------------------------------------------- step weights


def test_first_order_weights_are_ddim():
    walk = np.array([0.02, 0.3, 0.8, 1.0])
    for step in range(3):
        a_s, a_t = walk[step], walk[step + 1]
        ddim_x = np.sqrt((1 - a_t) / (1 - a_s))  # x_t = sqrt(a_t) x0 + sqrt(1 - a_t) (x_s - sqrt(a_s) x0) / sigma_s
        ddim_x0 = np.sqrt(a_t) - ddim_x * np.sqrt(a_s)
        np.testing.assert_allclose(multistep_weights(walk, step, 1), [ddim_x, ddim_x0], rtol=1e-12)


def test_multistep_weights_integrate_the_data_prediction_ode():
    # x_t = (sigma_t / sigma_s) x_s + sigma_t * integral of e^lambda D(lambda) from lambda_s to lambda_t, exactly.
    # A constant D is integrated exactly by every order, a D linear in lambda by 3M (2M, the midpoint form, and
    # 3M on a quadratic D are off by O(h^3) terms).
    walk = np.array([0.05, 0.2, 0.45, 0.7, 0.85])
    lam = 0.5 * np.log(walk / (1 - walk))
    step = 3

    def exact(poly):
        u = np.linspace(lam[step], lam[step + 1], 20001)
        f = np.exp(u) * np.polyval(poly, u)
        integral = np.sum((f[1:] + f[:-1]) * np.diff(u)) / 2
        return np.sqrt((1 - walk[step + 1]) / (1 - walk[step])) * 1.3 + np.sqrt(1 - walk[step + 1]) * integral

    def solver(poly, order):
        w = multistep_weights(walk, step, order)
        return w[0] * 1.3 + sum(w[j + 1] * np.polyval(poly, lam[step - j]) for j in range(order))

    for order in (1, 2, 3):
        assert abs(solver([0.4], order) - exact([0.4])) < 1e-9
    assert abs(solver([-0.7, 0.3], 3) - exact([-0.7, 0.3])) < 1e-9
    assert abs(solver([-0.7, 0.3], 2) - exact([-0.7, 0.3])) > 1e-3
    assert abs(solver([0.25, -0.7, 0.3], 3) - exact([0.25, -0.7, 0.3])) > 1e-3


# --------------------------------------------------------------------------------------------- convergence


@pytest.fixture(scope="module")
def gaussian_errors():
    """RMSE of DDIM, 2M and 3M on log-SNR grids of 20, 40 and 80 steps, linear schedule, data N(0.3, 0.5^2)."""
    model = GaussianDataModel(LINEAR, mu=0.3, std=0.5)
    noise = np.random.RandomState(0).randn(4, 3, 8, 8).astype(np.float32)
    # The exact ODE down to timestep 0, then the final step every walk takes to the clean image (x_0 = D(x)).
    exact = model.data_prediction(model.ode_solution(noise, 999, 0), 0)
    errors = {}
    for n in (20, 40, 80):
        diffusion = _spaced(space_timesteps(1000, "logsnr%d" % n, betas=LINEAR))
        for order in (1, 2, 3):
            out = diffusion.dpm_solver_sample_loop(model, list(noise.shape), noise=jt.array(noise),
                                                   clip_denoised=False, order=order)
            errors[order, n] = _rmse(out.numpy(), exact)
    return errors


def _slope(errors, order):
    steps = np.array([20, 40, 80])
    return -np.polyfit(np.log(steps), np.log([errors[order, n] for n in steps]), 1)[0]


def test_convergence_orders_on_gaussian_data(gaussian_errors):
    assert 0.85 <= _slope(gaussian_errors, 1) <= 1.15
    assert 1.7 <= _slope(gaussian_errors, 2) <= 2.3
    assert _slope(gaussian_errors, 3) >= 2.0
    for n in (40, 80):
        assert gaussian_errors[3, n] < gaussian_errors[2, n] < gaussian_errors[1, n]


def test_twenty_step_errors_reproduce_the_issue_picture(gaussian_errors):
    # Issue #18, linear schedule, log-SNR grid: DDIM-20 5.3e-2, 2M-20 6.6e-3; 40 steps halve DDIM's error and cut
    # 2M's about 4x. With std 0.5 the errors are 6.0e-2 and 7.4e-3 (std 0.44 gives the issue's 5.3e-2 / 6.6e-3).
    ddim, dpm2 = gaussian_errors[1, 20], gaussian_errors[2, 20]
    assert 4.5e-2 <= ddim <= 7.5e-2
    assert 5.5e-3 <= dpm2 <= 9.5e-3
    assert 1.8 <= ddim / gaussian_errors[1, 40] <= 2.2
    assert 3.3 <= dpm2 / gaussian_errors[2, 40] <= 4.7


def test_gaussian_model_is_the_exact_noise_prediction():
    model = GaussianDataModel(LINEAR, mu=0.3, std=0.5)
    rng = np.random.RandomState(6)
    t = 400
    a = model.alphas_cumprod[t]
    x0 = 0.3 + 0.5 * rng.randn(200000)
    eps = rng.randn(200000)
    x_t = np.sqrt(a) * x0 + np.sqrt(1 - a) * eps
    pred = model(jt.array(x_t.astype(np.float32)), jt.array(np.full(200000, t, np.int32))).numpy()
    # The least-squares predictor of eps from x_t: its error is uncorrelated with x_t (and with 1).
    resid = eps - pred
    assert abs(np.mean(resid)) < 0.01 and abs(np.mean(resid * x_t)) < 0.01
    # The exact ODE map sends N(m_400, v_400) onto the data distribution N(0.3, 0.5^2).
    x_clean = model.ode_solution(x_t, t)
    assert abs(x_clean.mean() - 0.3) < 0.01 and abs(x_clean.std() - 0.5) < 0.01
