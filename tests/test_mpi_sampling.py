"""Sampling scripts under `mpirun -np 2` (Jittor's MPI, on the CPU): the requested count, split across ranks,
gathered by rank 0 into one .npz, identical (images and labels, in order) to the single-process output.

classifier_sample.py (fixture 64x64 UNet + a tiny classifier, DDPM with random labels), DiT/sample_ddp.py
(tiny DiT + tiny VAE, classifier-free guidance) and scripts/super_res_sample.py (a random 32->64 model; its base
images are used cyclically) each run under mpirun and alone, all six launched side by side.
An odd count (5) with batch 2 gives 3 batches: rank 0 computes batches 0 and 2, rank 1 batch 1, and the last
batch is cut to 1 image.
"""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import guided_diffusion  # noqa: F401  (prepares Jittor's environment)
from sampling_helpers import CLASSIFIER_FLAGS, REPO, UNET, load_samples, save_tiny_classifier, unet_flags

pytestmark = pytest.mark.skipif(shutil.which("mpirun") is None,
                                reason="OpenMPI is not installed (make setup installs it)")

MPIRUN = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "2"]
N = 5
DIT_FIX = os.path.join(REPO, "tests", "fixtures", "dit")
DIT_FOLDER = "DiT-S-4-dit_tiny_p4-size-32-vae-ema-cfg-1.5-seed-3"


SR_FLAGS = ["--large_size", 64, "--small_size", 32, "--num_channels", 32, "--num_res_blocks", 1,
            "--attention_resolutions", "8", "--learn_sigma", "True", "--resblock_updown", "True"]


def _save_sr_model(path: str) -> str:
    """A super-resolution model built from SR_FLAGS with seeded random weights."""
    from guided_diffusion import checkpoint, script_util, state_dicts

    kw = script_util.sr_model_and_diffusion_defaults()
    kw.update(large_size=64, small_size=32, num_channels=32, num_res_blocks=1, attention_resolutions="8",
              learn_sigma=True, resblock_updown=True)
    model, _ = script_util.sr_create_model_and_diffusion(**kw)
    rng = np.random.RandomState(0)
    checkpoint.save_file({k: (v + rng.randn(*v.shape) * 0.02).astype(np.float32)
                          for k, v in state_dicts.module_state_dict(model).items()}, path)
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{(script, mode): (output dir, CompletedProcess)} for mode in ("mpi", "single")."""
    root = tmp_path_factory.mktemp("mpi_sampling")
    classifier = str(root / "classifier.pt")
    save_tiny_classifier(classifier)
    clf_args = unet_flags() + CLASSIFIER_FLAGS + [
        "--model_path", UNET, "--classifier_path", classifier, "--num_samples", N, "--batch_size", 2,
        "--timestep_respacing", "4", "--classifier_scale", "10", "--seed", 3]
    dit_args = ["--model", "DiT-S/4", "--depth", "2", "--hidden-size", "64", "--num-heads", "4", "--image-size", "32",
                "--vae-path", os.path.join(DIT_FIX, "vae_tiny"), "--ckpt", os.path.join(DIT_FIX, "dit_tiny_p4.pt"),
                "--num-sampling-steps", "2", "--num-fid-samples", N, "--per-proc-batch-size", 2, "--global-seed", 3]
    base = str(root / "base.npz")
    np.savez(base, np.random.RandomState(0).randint(0, 256, size=(3, 32, 32, 3)).astype(np.uint8), np.arange(3))
    sr_args = SR_FLAGS + ["--model_path", _save_sr_model(str(root / "sr.pt")), "--base_samples", base,
                          "--num_samples", N, "--batch_size", 2, "--timestep_respacing", "4"]
    commands = {
        "classifier_sample": [sys.executable, os.path.join(REPO, "classifier_sample.py")] + clf_args,
        "sample_ddp": [sys.executable, os.path.join(REPO, "DiT", "sample_ddp.py")] + dit_args,
        "super_res_sample": [sys.executable, os.path.join(REPO, "scripts", "super_res_sample.py")] + sr_args,
    }
    procs = {}
    try:
        for script, cmd in commands.items():
            for mode in ("mpi", "single"):
                out = root / ("%s_%s" % (script, mode))
                out.mkdir()
                env = dict(os.environ, OPENAI_LOGDIR=str(out), OPENAI_LOG_FORMAT="stdout,log")
                argv = (MPIRUN if mode == "mpi" else []) + [str(a) for a in cmd]
                procs[script, mode] = (out, subprocess.Popen(argv, cwd=str(out), env=env, stdout=subprocess.PIPE,
                                                             stderr=subprocess.PIPE, text=True))
        results = {}
        for key, (out, proc) in procs.items():
            stdout, stderr = proc.communicate(timeout=600)
            results[key] = (out, subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    finally:
        for _, proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    return results


def _ok(result):
    out, proc = result
    assert proc.returncode == 0, "%s exit %d\n--- stdout\n%s\n--- stderr\n%s" % (
        proc.args, proc.returncode, proc.stdout[-3000:], proc.stderr[-5000:])
    return out


def _assert_distinct(images):
    flat = images.reshape(len(images), -1)
    assert len({row.tobytes() for row in flat}) == len(images), "duplicated samples"


def test_classifier_sample_two_ranks_write_exactly_the_requested_samples(runs):
    out = _ok(runs["classifier_sample", "mpi"])
    npz = sorted(n for n in os.listdir(out) if n.endswith(".npz"))
    assert npz == ["samples_%dx64x64x3.npz" % N]  # one file, written once by rank 0
    assert not os.path.exists(out / ("samples_%d.partial" % N))
    data = load_samples(str(out / npz[0]))
    assert data["arr_0"].shape == (N, 64, 64, 3) and data["arr_0"].dtype == np.uint8
    assert data["arr_1"].shape == (N,) and data["arr_1"].dtype == np.int64
    _assert_distinct(data["arr_0"])
    log = (out / "log.txt").read_text()
    assert "sampling complete" in log and "created %d samples" % N in log
    assert os.path.exists(out / "log-rank001.txt")  # rank 1 logs to its own file, never to log.txt


def test_classifier_sample_two_ranks_equal_one_process_with_labels_aligned(runs):
    two = load_samples(str(_ok(runs["classifier_sample", "mpi"]) / ("samples_%dx64x64x3.npz" % N)))
    one = load_samples(str(_ok(runs["classifier_sample", "single"]) / ("samples_%dx64x64x3.npz" % N)))
    assert len(set(one["arr_1"].tolist())) > 1  # random labels, so a misaligned gather would show
    np.testing.assert_array_equal(two["arr_1"], one["arr_1"])
    np.testing.assert_array_equal(two["arr_0"], one["arr_0"])


def test_dit_sample_ddp_two_ranks_equal_one_process(runs):
    paths = {}
    for mode in ("mpi", "single"):
        folder = _ok(runs["sample_ddp", mode]) / "samples" / DIT_FOLDER
        assert os.path.samefile(str(folder) + ".npz", str(folder / ("samples_%dx32x32x3.npz" % N)))
        paths[mode] = str(folder) + ".npz"
    two, one = load_samples(paths["mpi"]), load_samples(paths["single"])
    assert two["arr_0"].shape == (N, 32, 32, 3) and two["arr_1"].shape == (N,)
    _assert_distinct(two["arr_0"])
    np.testing.assert_array_equal(two["arr_1"], one["arr_1"])
    np.testing.assert_array_equal(two["arr_0"], one["arr_0"])


def test_super_res_sample_two_ranks_equal_one_process(runs):
    name = "samples_%dx64x64x3.npz" % N
    two = load_samples(str(_ok(runs["super_res_sample", "mpi"]) / name))
    one = load_samples(str(_ok(runs["super_res_sample", "single"]) / name))
    assert list(two) == ["arr_0"] and two["arr_0"].shape == (N, 64, 64, 3)
    _assert_distinct(two["arr_0"])
    np.testing.assert_array_equal(two["arr_0"], one["arr_0"])


@pytest.mark.scenario
def test_a_sampling_rank_killed_by_sigsegv_mid_batch_ends_the_job_within_a_minute(tmp_path):
    import signal

    from training_helpers import signal_rank_once_logged

    classifier = str(tmp_path / "classifier.pt")
    save_tiny_classifier(classifier)
    cmd = MPIRUN + [sys.executable, os.path.join(REPO, "classifier_sample.py")] + [str(a) for a in unet_flags() + (
        CLASSIFIER_FLAGS + ["--model_path", UNET, "--classifier_path", classifier, "--num_samples", 400,
                            "--batch_size", 2, "--timestep_respacing", "25", "--classifier_scale", "10"])]
    env = dict(os.environ, OPENAI_LOGDIR=str(tmp_path), OPENAI_LOG_FORMAT="stdout,log")
    job = subprocess.Popen(cmd, cwd=str(tmp_path), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    ended = signal_rank_once_logged(job, tmp_path / "log.txt", "created 4 samples", 1, signal.SIGSEGV)  # sampling
    text = ended["output"]
    assert ended["returncode"] != 0 and ended["seconds"] < 60, (ended["returncode"], ended["seconds"], text[-3000:])
    assert "rank 1" in text and "signal 11" in text, text[-3000:]
