"""End-to-end tests of scripts/image_sample.py on the fixture 64x64 class-conditional UNet, plus the DDIM/DDPM
behaviour of the shared sampler it uses."""

import importlib.util
import os
import signal
import time

import numpy as np
import pytest

from guided_diffusion import model_loading, sampling
from sampling_helpers import (
    REPO,
    UNET,
    assert_ok,
    assert_user_error,
    load_samples,
    no_samples_npz,
    run_script,
    start_script,
    unet_flags,
)

SCRIPT = "scripts/image_sample.py"


def _args(num_samples=3):
    return unet_flags() + ["--model_path", UNET, "--num_samples", num_samples, "--batch_size", 2,
                           "--timestep_respacing", "ddim5", "--use_ddim", "True", "--class_labels", "3,7,11",
                           "--seed", 5]


@pytest.fixture(scope="module")
def ddim_run(tmp_path_factory):
    logdir = tmp_path_factory.mktemp("ddim")
    assert_ok(run_script(SCRIPT, _args(), logdir))
    return logdir, load_samples(os.path.join(logdir, "samples_3x64x64x3.npz"))


def _parse(argv):
    spec = importlib.util.spec_from_file_location("image_sample", os.path.join(REPO, SCRIPT))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.create_argparser().parse_args([str(a) for a in argv])


def test_image_sample_writes_npz_labels_and_grid(ddim_run):
    logdir, data = ddim_run
    assert sorted(data) == ["arr_0", "arr_1"]
    assert data["arr_0"].dtype == np.uint8 and data["arr_0"].shape == (3, 64, 64, 3)
    assert data["arr_1"].dtype == np.int64 and data["arr_1"].tolist() == [3, 7, 11]
    assert data["arr_0"].std() > 1  # real images, not a constant
    assert os.path.exists(os.path.join(logdir, "samples_3x64x64x3.png"))
    assert "sampling complete" in open(os.path.join(logdir, "log.txt")).read()


@pytest.fixture(scope="module")
def fixture_model():
    args = _parse(_args())
    from guided_diffusion.script_util import model_and_diffusion_defaults

    return model_loading.load_model_and_diffusion(args, model_and_diffusion_defaults().keys(), model_path=UNET)


def _sample(model_fn, diffusion, use_ddim):
    fn = sampling.make_diffusion_sampler(diffusion, model_fn, image_size=64, batch_size=2, seed=5,
                                         sampler="ddim" if use_ddim else "ddpm", num_classes=1000,
                                         fixed_labels=[3, 7, 11])
    return fn(0, 2)


def test_image_sample_ddim_output_is_the_ddim_sampler_output(ddim_run, fixture_model):
    model, diffusion = fixture_model
    images, labels = _sample(model, diffusion, use_ddim=True)
    assert labels.tolist() == [3, 7]
    np.testing.assert_array_equal(images, ddim_run[1]["arr_0"][:2])


def test_ddim_ignores_step_noise_and_ddpm_does_not(fixture_model):
    """Same initial noise, extra random draws between steps: DDIM (eta 0) is unchanged, DDPM changes."""
    import jittor as jt

    model, diffusion = fixture_model

    def rng_consuming_model(x, t, **kw):
        jt.randn((7,)).sync()  # shifts the random stream used for the per-step noise
        return model(x, t, **kw)

    ddim_a, _ = _sample(model, diffusion, use_ddim=True)
    ddim_b, _ = _sample(rng_consuming_model, diffusion, use_ddim=True)
    ddpm_a, _ = _sample(model, diffusion, use_ddim=False)
    ddpm_b, _ = _sample(rng_consuming_model, diffusion, use_ddim=False)
    np.testing.assert_array_equal(ddim_a, ddim_b)
    assert not np.array_equal(ddpm_a, ddpm_b)
    assert np.abs(ddim_a.astype(int) - ddpm_a.astype(int)).mean() > 1


def test_image_sample_resumes_after_interruption(ddim_run, tmp_path):
    proc = start_script(SCRIPT, _args(num_samples=4), tmp_path)
    first = tmp_path / "samples_4.partial" / "batch_000000.npz"
    try:
        deadline = time.time() + 400
        while not first.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert first.exists()
        proc.send_signal(signal.SIGINT)  # Ctrl-C while the second batch is being sampled
        assert proc.wait(120) != 0  # (Jittor's own SIGINT handler exits with status 1)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert no_samples_npz(tmp_path)  # nothing presented as finished
    assert sorted(os.listdir(tmp_path / "samples_4.partial")) == ["batch_000000.npz", "meta.json"]

    proc = run_script(SCRIPT, _args(num_samples=4), tmp_path)
    assert_ok(proc)
    assert "resuming: 1 of 2 batches already done" in proc.stdout
    data = load_samples(str(tmp_path / "samples_4x64x64x3.npz"))
    assert data["arr_0"].shape == (4, 64, 64, 3) and data["arr_1"].tolist() == [3, 7, 11, 3]
    # batches depend only on (seed, batch index): the resumed run equals an uninterrupted one
    np.testing.assert_array_equal(data["arr_0"][:3], ddim_run[1]["arr_0"])
    assert not (tmp_path / "samples_4.partial").exists()


def test_image_sample_reports_checkpoint_not_fitting_flags(tmp_path):
    proc = run_script(SCRIPT, _args() + ["--learn_sigma", "False"], tmp_path)
    assert_user_error(proc, "--learn_sigma True")
    assert no_samples_npz(tmp_path)


def test_image_sample_reports_missing_model(tmp_path):
    proc = run_script(SCRIPT, unet_flags() + ["--model_path", str(tmp_path / "missing.pt")], tmp_path)
    assert_user_error(proc, "--model_path", "missing.pt", "not found")


def test_image_sample_rejects_labels_for_unconditional_model(tmp_path):
    proc = run_script(SCRIPT, _args() + ["--class_cond", "False"], tmp_path)
    assert_user_error(proc, "--class_labels needs a class-conditional model")


def test_image_sample_rejects_ddim_with_unusable_spacing(tmp_path):
    proc = run_script(SCRIPT, _args() + ["--timestep_respacing", "ddim7", "--diffusion_steps", "10"], tmp_path)
    assert_user_error(proc, "--timestep_respacing", "does not fit --diffusion_steps 10")


def test_image_sample_runs_dpm_solver_on_a_log_snr_grid_and_matches_the_package_loop(tmp_path):
    args = _args(num_samples=2)
    args[args.index("ddim5")] = "logsnr4"
    args[args.index("--use_ddim") + 1] = "False"
    assert_ok(run_script(SCRIPT, args + ["--sampler", "dpm++3m"], tmp_path))
    data = load_samples(str(tmp_path / "samples_2x64x64x3.npz"))
    parsed = _parse(args)
    from guided_diffusion.script_util import model_and_diffusion_defaults

    model, diffusion = model_loading.load_model_and_diffusion(parsed, model_and_diffusion_defaults().keys(),
                                                              model_path=UNET)
    assert diffusion.num_timesteps == 4 and max(diffusion.timestep_map) == 999
    fn = sampling.make_diffusion_sampler(diffusion, model, image_size=64, batch_size=2, seed=5, sampler="dpm++3m",
                                         num_classes=1000, fixed_labels=[3, 7, 11])
    images, labels = fn(0, 2)
    np.testing.assert_array_equal(images, data["arr_0"])
    assert labels.tolist() == data["arr_1"].tolist() == [3, 7]


def test_image_sample_refuses_use_ddim_with_another_sampler_and_an_unknown_sampler(tmp_path):
    proc = run_script(SCRIPT, _args() + ["--sampler", "dpm++2m"], tmp_path)
    assert_user_error(proc, "--use_ddim True asks for DDIM but --sampler is dpm++2m")
    proc = run_script(SCRIPT, _args() + ["--use_ddim", "False", "--sampler", "euler"], tmp_path)
    assert_user_error(proc, "unknown --sampler 'euler'", "dpm++3m")
    assert no_samples_npz(tmp_path)
