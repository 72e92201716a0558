"""Training under `mpirun -np 2` (Jittor's MPI, on the CPU) against one process on the combined batch.

A driver script (written into tmp_path) trains a tiny denoiser with the real TrainLoop (AdamW, weight decay, two
EMA rates, checkpoints) once under mpirun with 2 ranks (each rank gets its half, samples r::2, of every global
batch: the sharding load_data uses) and once alone on the whole batch. Timesteps and noise are a function of each
sample's global index (a wrapper around the diffusion), so both runs draw the same ones and the parameters must
agree (and so must the logged norms of the all-reduced gradients: AdamW alone would hide a sum instead of a
mean). Then the real image_train.py, free_train.py, classifier_train.py and DiT/train.py (on a dataset that does
not split evenly) run under mpirun side by side.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

import guided_diffusion  # noqa: F401  (prepares Jittor's environment)
from guided_diffusion.checkpoint import load_file
from training_helpers import mpi_rank_pids, script_cmd, stop_and_continue

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIT_FIX = os.path.join(REPO, "tests", "fixtures", "dit")

pytestmark = pytest.mark.skipif(shutil.which("mpirun") is None,
                                reason="OpenMPI is not installed (make setup installs it)")

MPIRUN = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "2"]

DRIVER = textwrap.dedent(
    '''
    import json, os, sys
    import guided_diffusion
    import jittor as jt
    import numpy as np
    from guided_diffusion import checkpoint, dist_util, logger, train_util
    from guided_diffusion.image_datasets import load_data
    from guided_diffusion.resample import UniformSampler
    from guided_diffusion.script_util import create_gaussian_diffusion

    out, mode = sys.argv[1], sys.argv[2]
    rank, world = dist_util.get_rank(), dist_util.get_world_size()
    assert world == (2 if mode == "mpi" else 1), (mode, world)
    GLOBAL, STEPS, T = 4, 3, 50  # (20 linear steps would reach alpha_bar = 0: a non-finite vb term)


    class Tiny(jt.nn.Module):
        def __init__(self):
            self.conv = jt.nn.Conv2d(3, 8, 3, padding=1)
            self.temb = jt.nn.Linear(1, 8)
            self.out = jt.nn.Conv2d(8, 6, 3, padding=1)

        def execute(self, x, t, **kw):
            h = self.conv(x) + self.temb(t.float32().reshape(-1, 1) / T).reshape(-1, 8, 1, 1)
            return self.out(jt.nn.silu(h))


    class IndexedDiffusion:
        """Timestep and noise of each sample from its global index (cond "idx"), whatever the rank."""

        def __init__(self, base):
            self.base, self.num_timesteps = base, base.num_timesteps

        def training_losses(self, model, x, t, model_kwargs=None, noise=None):
            kw = dict(model_kwargs)
            idx = kw.pop("idx").numpy().astype(np.int64).reshape(-1)
            t = jt.array(((idx * 7 + 3) % T).astype(np.int32))
            noise = np.stack([np.random.RandomState(int(i)).randn(3, 8, 8) for i in idx]).astype(np.float32)
            return self.base.training_losses(model, x, t, model_kwargs=kw, noise=jt.array(noise))


    images = np.random.RandomState(123).uniform(-1, 1, (GLOBAL * STEPS, 3, 8, 8)).astype(np.float32)


    def data():
        step = 0
        while True:
            idx = np.arange(step * GLOBAL, (step + 1) * GLOBAL) % len(images)
            mine = idx[rank::world]
            yield images[mine], {"idx": mine}
            step += 1


    saved = []
    save_file = checkpoint.save_file


    def spy(obj, path):
        saved.append(os.path.basename(path))
        save_file(obj, path)


    checkpoint.save_file = spy
    logger.configure(dir=os.path.join(out, "logs_" + mode))
    jt.set_global_seed(0)  # different initial weights on each rank (Jittor offsets the seed by rank)
    model = Tiny()
    init = [p.numpy().copy() for p in model.parameters()]
    base = create_gaussian_diffusion(steps=T, learn_sigma=True)
    loop = train_util.TrainLoop(
        model=model, diffusion=IndexedDiffusion(base), data=data(), batch_size=GLOBAL // world, microbatch=-1,
        lr=1e-2, ema_rate="0.9,0.5", log_interval=1, save_interval=2, resume_checkpoint="",
        schedule_sampler=UniformSampler(base), weight_decay=0.1, lr_anneal_steps=STEPS,
    )
    loop.run_loop()
    result = {"init%d" % i: v for i, v in enumerate(init)}
    result.update({"param%d" % i: p.numpy() for i, p in enumerate(loop.mp_trainer.master_params)})
    for j, params in enumerate(loop.ema_params):
        result.update({"ema%d_%d" % (j, i): p.numpy() for i, p in enumerate(params)})

    info = {"saved": saved, "global_batch": loop.global_batch}
    if mode == "mpi":
        # load_data shards an image folder by rank: file i (label i) goes to rank i % 2, and no image is lost.
        data = load_data(data_dir=os.path.join(out, "imgs"), batch_size=1, image_size=8, class_cond=True,
                         deterministic=True)
        info["labels"] = sorted(int(next(data)[1]["y"][0]) for _ in range(3))
        data.close()
        gathered = dist_util.all_gather_array(np.array(info["labels"], dtype=np.int64))
        info["gathered_labels"] = [g.tolist() for g in gathered]
    np.savez(os.path.join(out, "%s_rank%d.npz" % (mode, rank)), **result)
    with open(os.path.join(out, "%s_rank%d.json" % (mode, rank)), "w") as f:
        json.dump(info, f)
    '''
)


def _env(**extra):
    env = dict(os.environ, OPENAI_LOG_FORMAT="log,csv", **extra)
    env.pop("DIFFUSION_TRAINING_TEST", None)
    return env


def _check(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, "exit %d\n--- stdout\n%s\n--- stderr\n%s" % (
        proc.returncode, proc.stdout[-3000:], proc.stderr[-5000:])


def _write_images(folder, n, names=None):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.RandomState(0)
    for i in range(n):
        name = names[i] if names else "c%d_%d.png" % (i, i)
        path = os.path.join(folder, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.fromarray(rng.randint(0, 256, (36, 40, 3), dtype=np.uint8)).save(path)
    return str(folder)


@pytest.fixture(scope="module")
def driver_runs(tmp_path_factory):
    """The driver under mpirun -np 2 and alone, launched side by side."""
    out = tmp_path_factory.mktemp("mpi_train")
    _write_images(out / "imgs", 6)
    script = out / "driver.py"
    script.write_text(DRIVER)
    cmd = [sys.executable, str(script), str(out)]
    mpi = subprocess.Popen(MPIRUN + cmd + ["mpi"], cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    single = subprocess.run(cmd + ["single"], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    try:
        stdout, stderr = mpi.communicate(timeout=600)
    finally:
        if mpi.poll() is None:
            mpi.kill()
    _check(single)
    _check(subprocess.CompletedProcess(mpi.args, mpi.returncode, stdout, stderr))

    def load(name):
        with np.load(str(out / (name + ".npz"))) as z:
            arrays = {k: z[k] for k in z.files}
        with open(str(out / (name + ".json"))) as f:
            return arrays, json.load(f)

    return out, {name: load(name) for name in ("mpi_rank0", "mpi_rank1", "single_rank0")}


def test_two_ranks_end_with_the_parameters_of_one_process_on_the_combined_batch(driver_runs):
    _, runs = driver_runs
    two, one = runs["mpi_rank0"][0], runs["single_rank0"][0]
    params = sorted(k for k in one if not k.startswith("init"))
    assert any(k.startswith("ema1_") for k in params)
    assert set(params) <= set(two)
    moved = 0
    for k in params:
        np.testing.assert_allclose(two[k], one[k], rtol=0, atol=1e-5, err_msg=k)
        if k.startswith("param"):
            moved += not np.allclose(one[k], one["init" + k[len("param"):]], atol=1e-3)
    assert moved >= 4  # training changed the weights, so the comparison means something
    # AdamW hides the gradients' scale; the logged norms of the all-reduced gradients show it (a mean, not a sum).
    out = driver_runs[0]
    two_norms = _progress_column(out / "logs_mpi" / "progress.csv", "grad_norm")
    one_norms = _progress_column(out / "logs_single" / "progress.csv", "grad_norm")
    assert len(one_norms) == 3 and min(one_norms) > 0
    np.testing.assert_allclose(two_norms, one_norms, rtol=1e-5)
    assert runs["mpi_rank0"][1]["global_batch"] == runs["single_rank0"][1]["global_batch"] == 4


def test_ranks_start_different_then_hold_identical_weights_and_emas(driver_runs):
    _, runs = driver_runs
    r0, r1 = runs["mpi_rank0"][0], runs["mpi_rank1"][0]
    # Jittor seeds each rank differently: without sync_params the ranks would train different models.
    assert not np.array_equal(r0["init0"], r1["init0"])
    for k in r0:
        if not k.startswith("init"):
            np.testing.assert_array_equal(r0[k], r1[k], err_msg=k)


def test_only_rank_zero_writes_checkpoints(driver_runs):
    out, runs = driver_runs
    expected = {"model000002.pt", "ema_0.9_000002.pt", "ema_0.5_000002.pt", "opt000002.pt",
                "model000003.pt", "ema_0.9_000003.pt", "ema_0.5_000003.pt", "opt000003.pt"}
    assert set(runs["mpi_rank0"][1]["saved"]) == expected
    assert runs["mpi_rank1"][1]["saved"] == []
    logs = set(os.listdir(out / "logs_mpi"))
    assert expected | {"log.txt", "progress.csv", "log-rank001.txt"} <= logs
    assert not any(n.startswith("progress-rank") for n in logs)
    # the written EMA is the EMA every rank holds
    ema = load_file(str(out / "logs_mpi" / "ema_0.5_000003.pt"))
    values = sorted(v.tobytes() for v in ema.values())
    held = sorted(v.astype(np.float32).tobytes() for k, v in runs["mpi_rank1"][0].items() if k.startswith("ema1_"))
    assert values == held


def test_load_data_gives_each_rank_a_disjoint_shard(driver_runs):
    _, runs = driver_runs
    r0, r1 = runs["mpi_rank0"][1], runs["mpi_rank1"][1]
    assert r0["labels"] == [0, 2, 4] and r1["labels"] == [1, 3, 5]  # files[rank::2], as the reference shards
    assert r0["gathered_labels"] == r1["gathered_labels"] == [[0, 2, 4], [1, 3, 5]]


@pytest.fixture(scope="module")
def script_runs(tmp_path_factory):
    """image_train.py (twice), DiT/train.py, free_train.py and classifier_train.py under mpirun -np 2, side by
    side."""
    out = tmp_path_factory.mktemp("mpi_scripts")
    adm_data = _write_images(out / "adm_imgs", 4, ["c%d_%d.png" % (i % 2, i) for i in range(4)])
    # 5 images over 2 ranks: the epoch's order is padded to 6, so each rank reads 3 (one repeat overall)
    dit_data = _write_images(out / "dit_imgs", 5, ["cat/%d.png" % i if i < 3 else "dog/%d.png" % i for i in range(5)])
    adm = [sys.executable, os.path.join(REPO, "image_train.py"), "--data_dir", adm_data, "--batch_size", "1",
           "--lr_anneal_steps", "2", "--save_interval", "1", "--log_interval", "1", "--ema_rate", "0.9",
           "--image_size", "32", "--num_channels", "16", "--num_res_blocks", "1", "--channel_mult", "1,2",
           "--attention_resolutions", "16", "--diffusion_steps", "50", "--class_cond", "True",
           "--learn_sigma", "True"]
    dit = [sys.executable, os.path.join(REPO, "DiT", "train.py"), "--model", "DiT-S/4", "--depth", "2",
           "--hidden-size", "64", "--num-heads", "4", "--image-size", "32", "--vae-path",
           os.path.join(DIT_FIX, "vae_tiny"), "--num-classes", "2", "--data-path", dit_data,
           "--global-batch-size", "2", "--epochs", "1", "--results-dir", str(out / "res"), "--log-every", "1",
           "--ckpt-every", "1"]
    tiny = ["--image_size", "32", "--num_channels", "16", "--num_res_blocks", "1", "--channel_mult", "1,2",
            "--attention_resolutions", "16", "--num_heads", "1", "--diffusion_steps", "50"]
    free = [sys.executable, os.path.join(REPO, "free_train.py"), "--data_dir", adm_data, "--batch_size", "1",
            "--lr_anneal_steps", "2", "--save_interval", "2", "--log_interval", "1", "--num_classes", "2",
            "--p_uncond", "0.5"] + tiny
    val_data = _write_images(out / "val_imgs", 2, ["c%d_%d.png" % (i, i) for i in range(2)])
    clf = [sys.executable, os.path.join(REPO, "classifier_train.py"), "--data_dir", adm_data, "--val_data_dir",
           val_data, "--batch_size", "1", "--iterations", "2", "--save_interval", "2", "--log_interval", "1",
           "--eval_interval", "1", "--image_size", "64", "--classifier_width", "16", "--classifier_depth", "1",
           "--classifier_attention_resolutions", "8", "--diffusion_steps", "50"]
    procs = [subprocess.Popen(MPIRUN + cmd, cwd=str(out), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=_env(OPENAI_LOGDIR=str(out / name)))
             for name, cmd in (("adm_logs", adm), ("dit_logs", dit), ("free_logs", free), ("clf_logs", clf),
                               ("adm_logs_again", adm))]
    results = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=600)
            results.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return out, results


def test_image_train_under_mpirun_counts_the_global_batch_and_rank_zero_saves(script_runs):
    out, (adm, _, _, _, _) = script_runs
    _check(adm)
    logs = out / "adm_logs"
    names = set(os.listdir(logs))
    assert {"model000001.pt", "model000002.pt", "ema_0.9_000002.pt", "opt000002.pt", "log.txt",
            "progress.csv", "log-rank001.txt"} <= names
    assert _progress_column(logs / "progress.csv", "samples") == [2.0, 4.0]  # (step + 1) * batch_size * world


def test_image_train_under_mpirun_twice_gives_the_same_weights_at_every_step(script_runs):
    out, results = script_runs
    _check(results[4])
    for step in (1, 2):
        for name in ("model%06d.pt" % step, "ema_0.9_%06d.pt" % step):
            a, b = load_file(str(out / "adm_logs" / name)), load_file(str(out / "adm_logs_again" / name))
            for k in a:
                np.testing.assert_array_equal(a[k], b[k], err_msg=name + ":" + k)


def test_dit_train_under_mpirun_with_a_padded_epoch_finishes_and_saves_once(script_runs):
    out, (_, dit, _, _, _) = script_runs
    _check(dit)
    runs = os.listdir(out / "res")
    assert runs == ["000-DiT-S-4"]  # one experiment folder (rank 0's)
    ckpts = sorted(os.listdir(out / "res" / runs[0] / "checkpoints"))
    # 5 images over 2 ranks, 1 per rank per step: one epoch is ceil(5 / 2) = 3 steps on every rank (DiT's
    # DistributedSampler pads the order)
    assert ckpts == ["0000001.pt", "0000002.pt", "0000003.pt"]
    ckpt = load_file(str(out / "res" / runs[0] / "checkpoints" / "0000003.pt"))
    assert set(ckpt) == {"model", "ema", "opt", "args"}
    log = (out / "res" / runs[0] / "log.txt").read_text()
    assert "(step=0000003) Train Loss:" in log


def _progress_column(path, key):
    with open(str(path)) as f:
        rows = [line.rstrip("\n").split(",") for line in f if line.strip()]
    return [float(r[rows[0].index(key)]) for r in rows[1:]]


@pytest.mark.parametrize("index,name,files", [
    (2, "free_logs", ["model000002.pt", "ema_0.9999_000002.pt", "opt000002.pt"]),
    (3, "clf_logs", ["model000002.pt", "opt000002.pt"]),
])
def test_free_and_classifier_train_run_under_mpirun_and_count_the_global_batch(script_runs, index, name, files):
    out, results = script_runs
    _check(results[index])
    names = set(os.listdir(out / name))
    assert set(files) | {"log.txt", "progress.csv", "log-rank001.txt"} <= names
    assert _progress_column(out / name / "progress.csv", "samples") == [2.0, 4.0]


def test_sigterm_to_one_rank_stops_both_at_the_same_step_and_a_rerun_matches_an_uninterrupted_run(tmp_path):
    steps = 16
    data = _write_images(tmp_path / "imgs", 8, ["c%d_%d.png" % (i % 2, i) for i in range(8)])
    cmd = MPIRUN + script_cmd("image_train.py", [
        "--data_dir", data, "--batch_size", 1, "--lr_anneal_steps", steps, "--save_interval", 1000,
        "--log_interval", 1, "--ema_rate", "0.9", "--image_size", 32, "--num_channels", 16, "--num_res_blocks", 1,
        "--channel_mult", "1,2", "--attention_resolutions", 16, "--diffusion_steps", 50, "--class_cond", True])
    out = stop_and_continue(
        lambda d: cmd, lambda d: _env(OPENAI_LOGDIR=str(d)), signum=signal.SIGTERM, run_dir=tmp_path / "run",
        full_dir=tmp_path / "full", log_file="log.txt", logged_step=r"\|\s*step\s*\|\s*2 ",
        final_files=["model%06d.pt" % steps, "ema_0.9_%06d.pt" % steps],
        set_files=lambda s: ["ema_0.9_%06d.pt" % s, "opt%06d.pt" % s, "model%06d.pt" % s],
        targets=lambda proc: [mpi_rank_pids(proc)[1]])  # a scheduler's signal reaching one rank only
    step = out["step"]
    print("SIGTERM to rank 1 after step %d; worst relative difference: %g" % (step, out["worst_relative_difference"]))
    assert 3 <= step < steps and out["worst_relative_difference"] == 0.0
    # rank 1 stopped at the same step, and only rank 0 wrote the set
    rank1_log = (tmp_path / "run" / "log-rank001.txt").read_text()
    assert "stopped by SIGTERM after step %d" % step in rank1_log
