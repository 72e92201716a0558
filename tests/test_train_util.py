"""Tests for guided_diffusion.train_util: exact resumption, checkpoints, AdamW, logging, the classifier loop."""

import os

import jittor as jt
import numpy as np
import pytest
from PIL import Image

from guided_diffusion import cpu
from guided_diffusion import logger
from guided_diffusion.checkpoint import load_file
from guided_diffusion.errors import CheckpointError
from guided_diffusion.image_datasets import load_data
from guided_diffusion.resample import LossSecondMomentResampler
from guided_diffusion.run_guard import TrainingDiverged
from guided_diffusion.script_util import (
    classifier_and_diffusion_defaults,
    create_classifier_and_diffusion,
    create_model_and_diffusion,
    model_and_diffusion_defaults,
)
from guided_diffusion.train_util import (
    AdamW,
    ClassifierTrainLoop,
    TrainLoop,
    compute_top_k,
    cross_entropy,
    log_loss_dict,
    parse_resume_step_from_filename,
    split_microbatches,
)

TINY = dict(image_size=32, num_channels=16, num_res_blocks=1, channel_mult="1,2", attention_resolutions="16",
            diffusion_steps=50, class_cond=True, learn_sigma=True)


def make_images(folder, n=6, size=32, seed=0):
    rng = np.random.RandomState(seed)
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.randint(0, 256, (size, size, 3), dtype=np.uint8)).save(
            os.path.join(folder, "c%d_%d.png" % (i % 2, i)))
    return str(folder)


def tiny_model_and_diffusion(**overrides):
    flags = model_and_diffusion_defaults()
    flags.update(TINY)
    flags.update(overrides)
    jt.set_global_seed(123)  # the same initial weights in every run
    return create_model_and_diffusion(**flags)


def train(logdir, data_dir, steps, resume="", save_interval=2, **kw):
    model, diffusion = tiny_model_and_diffusion()
    data = load_data(data_dir=data_dir, batch_size=2, image_size=32, class_cond=True)
    with logger.scoped_configure(dir=str(logdir), format_strs=["log", "csv"]):
        loop = TrainLoop(model=model, diffusion=diffusion, data=data, batch_size=2, microbatch=kw.pop("microbatch", -1),
                         lr=1e-3, ema_rate="0.9,0.99", log_interval=1, save_interval=save_interval,
                         resume_checkpoint=resume, lr_anneal_steps=steps, weight_decay=0.01, **kw)
        loop.run_loop()
    data.close()
    return loop


def _flush_subnormals(a):
    a = np.array(a, copy=True)
    if a.dtype.kind == "f":
        a[np.abs(a) < 1.1754944e-38] = 0
    return a


def test_resumed_run_continues_exactly_like_an_uninterrupted_run(tmp_path, monkeypatch):
    data_dir = make_images(tmp_path / "imgs")
    full = tmp_path / "full"
    train(full, data_dir, steps=4)
    assert {"model000002.pt", "model000004.pt", "opt000002.pt", "opt000004.pt", "ema_0.9_000004.pt",
            "ema_0.99_000002.pt"} <= set(os.listdir(full))

    part = tmp_path / "part"
    monkeypatch.setenv("DIFFUSION_TRAINING_TEST", "1")  # stop after the first save (step 2 of 4)
    train(part, data_dir, steps=4)
    monkeypatch.delenv("DIFFUSION_TRAINING_TEST")
    assert not os.path.exists(part / "model000004.pt")
    ckpt = part / "model000002.pt"
    before = {f: (part / f).read_bytes() for f in os.listdir(part) if f.endswith(".pt")}
    resumed = tmp_path / "resumed"
    loop = train(resumed, data_dir, steps=4, resume=str(ckpt))
    assert loop.resume_step == 2 and loop.step == 2
    # the checkpoint it resumed from (and its EMA/opt files) are untouched
    assert {f: (part / f).read_bytes() for f in os.listdir(part) if f.endswith(".pt")} == before
    assert sorted(f for f in os.listdir(resumed) if f.endswith(".pt")) == [
        "ema_0.99_000004.pt", "ema_0.9_000004.pt", "model000004.pt", "opt000004.pt"]

    for name in ("model000004.pt", "ema_0.9_000004.pt", "ema_0.99_000004.pt"):
        a, b = load_file(str(full / name)), load_file(str(resumed / name))
        assert list(a) == list(b)
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=name + ":" + k)
    a, b = load_file(str(full / "opt000004.pt")), load_file(str(resumed / "opt000004.pt"))
    assert a["param_groups"] == b["param_groups"]
    assert len(a["state"]) == len(b["state"]) > 0
    for i in a["state"]:
        assert float(a["state"][i]["step"]) == float(b["state"][i]["step"]) == 4.0
        for k in ("exp_avg", "exp_avg_sq"):
            # equal; values below float32's smallest normal may be flushed to zero in one run and not the other
            np.testing.assert_array_equal(_flush_subnormals(a["state"][i][k]), _flush_subnormals(b["state"][i][k]))
    # logs continue with the global step number
    with open(resumed / "progress.csv") as f:
        header = f.readline().strip().split(",")
        steps = [line.strip().split(",")[header.index("step")] for line in f]
    assert steps == ["2", "3"]


def test_checkpoints_are_torch_zip_files_with_fp32_weights(tmp_path):
    import zipfile

    loop = train(tmp_path / "run", make_images(tmp_path / "imgs"), steps=1, save_interval=100)
    path = tmp_path / "run" / "model000001.pt"
    assert zipfile.is_zipfile(path)
    sd = load_file(str(path))
    names = [n for n, _ in loop.model.named_parameters()]
    assert list(sd) == names and all(v.dtype == np.float32 for v in sd.values())
    opt = load_file(str(tmp_path / "run" / "opt000001.pt"))
    assert opt["param_groups"][0]["betas"] == (0.9, 0.999) and opt["param_groups"][0]["eps"] == 1e-8


def test_missing_or_mismatched_resume_files_raise_checkpoint_errors(tmp_path):
    data_dir = make_images(tmp_path / "imgs")
    with pytest.raises(CheckpointError, match="does not exist"):
        train(tmp_path / "x", data_dir, steps=1, resume=str(tmp_path / "model000007.pt"))
    opt = AdamW([jt.zeros(3), jt.zeros((2, 2))], lr=1e-3)
    with pytest.raises(CheckpointError, match="another model"):
        opt.load_state_dict({"state": {}, "param_groups": [{"params": [0]}]}, source="opt000001.pt")


def test_short_overfit_run_lowers_the_loss(tmp_path):
    data_dir = make_images(tmp_path / "imgs", n=2)
    model, diffusion = tiny_model_and_diffusion(learn_sigma=False, class_cond=False)
    data = load_data(data_dir=data_dir, batch_size=2, image_size=32, deterministic=True, random_flip=False)
    x = jt.array(next(data)[0])
    data.close()
    t, noise = jt.array(np.array([10, 30], np.int32)), jt.randn(2, 3, 32, 32)

    def fixed_loss():  # the loss at fixed timesteps and noise
        with jt.no_grad():
            return float(diffusion.training_losses(model, x, t, noise=noise)["loss"].mean().item())

    before = fixed_loss()
    data = load_data(data_dir=data_dir, batch_size=2, image_size=32, deterministic=True, random_flip=False)
    with logger.scoped_configure(dir=str(tmp_path / "log"), format_strs=[]):
        loop = TrainLoop(model=model, diffusion=diffusion, data=data, batch_size=2, microbatch=-1, lr=1e-2,
                         ema_rate="0.9", log_interval=1, save_interval=10 ** 6, resume_checkpoint="")
        for _ in range(12):
            loop.run_step(*next(data))
            logger.dumpkvs()
            loop.step += 1
    data.close()
    after = fixed_loss()
    assert after < 0.6 * before, (before, after)


def test_microbatches_sum_gradients_like_the_reference(tmp_path):
    data_dir = make_images(tmp_path / "imgs", n=2)

    def grads(microbatch):
        model, diffusion = tiny_model_and_diffusion(learn_sigma=False, class_cond=False)
        data = load_data(data_dir=data_dir, batch_size=2, image_size=32, deterministic=True)
        with logger.scoped_configure(dir=str(tmp_path / "log"), format_strs=[]):
            loop = TrainLoop(model=model, diffusion=diffusion, data=data, batch_size=2, microbatch=microbatch,
                             lr=1e-3, ema_rate="0.9", log_interval=1, save_interval=100, resume_checkpoint="")
            # a deterministic per-sample loss, so both runs see the same values
            loop.schedule_sampler.sample = lambda n, dev: (jt.full((n,), 7, "int32"), jt.ones(n))
            diffusion.training_losses = lambda m, x, t, model_kwargs=None: {
                "loss": (m(x, t) ** 2).mean(dims=(1, 2, 3))}
            loop.forward_backward(*next(data))
        data.close()
        return [g.numpy() for g in loop.mp_trainer._grads]

    whole, micro = grads(-1), grads(1)
    for a, b in zip(whole, micro):
        np.testing.assert_allclose(2 * a, b, rtol=1e-4, atol=1e-6)


def test_adamw_matches_torch_formulas_and_restores_its_state():
    rng = np.random.RandomState(0)
    p0 = rng.randn(5).astype(np.float32)
    gs = [rng.randn(5).astype(np.float32) for _ in range(3)]
    p = jt.array(p0)
    opt = AdamW([p], lr=0.1, weight_decay=0.05)
    ref, m, v = p0.astype(np.float64), np.zeros(5), np.zeros(5)
    for n, g in enumerate(gs[:2], start=1):
        opt.step_with_grads([p], [jt.array(g)])
        ref = ref * (1 - 0.1 * 0.05)
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        ref = ref - (0.1 / (1 - 0.9 ** n)) * m / (np.sqrt(v) / np.sqrt(1 - 0.999 ** n) + 1e-8)
    np.testing.assert_allclose(p.numpy(), ref, rtol=1e-5)
    state = opt.state_dict()
    q = jt.array(p.numpy())
    opt2 = AdamW([q], lr=0.5)
    opt2.load_state_dict(state)
    opt.step_with_grads([p], [jt.array(gs[2])])
    opt2.step_with_grads([q], [jt.array(gs[2])])
    np.testing.assert_array_equal(p.numpy(), q.numpy())


def test_loss_aware_sampler_receives_the_losses(tmp_path):
    data_dir = make_images(tmp_path / "imgs", n=2)
    model, diffusion = tiny_model_and_diffusion(learn_sigma=False, class_cond=False)
    sampler = LossSecondMomentResampler(diffusion)
    data = load_data(data_dir=data_dir, batch_size=2, image_size=32)
    with logger.scoped_configure(dir=str(tmp_path / "log"), format_strs=[]):
        loop = TrainLoop(model=model, diffusion=diffusion, data=data, batch_size=2, microbatch=1, lr=1e-3,
                         ema_rate="0.9", log_interval=1, save_interval=100, resume_checkpoint="",
                         schedule_sampler=sampler)
        loop.run_step(*next(data))
    data.close()
    assert sampler._loss_counts.sum() == 2


def test_helpers_parse_names_log_quartiles_and_split():
    assert parse_resume_step_from_filename("/a/b/model012345.pt") == 12345
    assert parse_resume_step_from_filename("/a/b/ckpt.pt") == 0
    assert parse_resume_step_from_filename("modelfoo.pt") == 0

    class D:
        num_timesteps = 100

    with logger.scoped_configure(format_strs=[]):
        log_loss_dict(D(), np.array([0, 30, 99]), {"loss": np.array([1.0, 2.0, 3.0])})
        kvs = logger.getkvs()
        assert kvs["loss"] == pytest.approx(2.0)
        assert kvs["loss_q0"] == 1.0 and kvs["loss_q1"] == 2.0 and kvs["loss_q3"] == 3.0
    parts = list(split_microbatches(2, np.arange(5), np.arange(5) * 10))
    assert [p[0].tolist() for p in parts] == [[0, 1], [2, 3], [4]]
    assert len(list(split_microbatches(-1, np.arange(5)))) == 1
    logits = np.array([[0.1, 0.5, 0.2], [3.0, 1.0, 2.0]], np.float32)
    assert compute_top_k(logits, np.array([1, 2]), k=1, reduction="none").tolist() == [1.0, 0.0]
    assert compute_top_k(logits, np.array([1, 2]), k=2) == 1.0
    ce = cross_entropy(jt.array(logits), jt.array(np.array([1, 2]))).numpy()
    ref = -np.log(np.exp(logits) / np.exp(logits).sum(1, keepdims=True))[[0, 1], [1, 2]]
    np.testing.assert_allclose(ce, ref, rtol=1e-5)


def test_classifier_loop_trains_on_noised_inputs_and_resumes(tmp_path):
    data_dir = make_images(tmp_path / "imgs", n=4)
    flags = classifier_and_diffusion_defaults()
    flags.update(image_size=64, classifier_width=16, classifier_depth=1, classifier_attention_resolutions="8",
                 diffusion_steps=50)

    def run(logdir, iterations, resume=""):
        jt.set_global_seed(1)
        model, diffusion = create_classifier_and_diffusion(**flags)
        seen = []
        orig = diffusion.q_sample

        def spy(x, t, noise=None):
            seen.append(t.numpy().copy())
            return orig(x, t, noise=noise)

        diffusion.q_sample = spy
        data = load_data(data_dir=data_dir, batch_size=2, image_size=64, class_cond=True, random_crop=True)
        with logger.scoped_configure(dir=str(logdir), format_strs=["csv"]):
            loop = ClassifierTrainLoop(model=model, diffusion=diffusion, data=data, batch_size=2, lr=1e-3,
                                       iterations=iterations, noised=True, resume_checkpoint=resume,
                                       log_interval=1, save_interval=2)
            loop.run_loop()
        data.close()
        return seen

    seen = run(tmp_path / "a", 3)
    assert len(seen) == 3 and all(t.shape == (2,) and (t >= 0).all() and (t < 50).all() for t in seen)
    assert sorted(f for f in os.listdir(tmp_path / "a") if f.endswith(".pt")) == [
        "model000002.pt", "model000003.pt", "opt000002.pt", "opt000003.pt"]
    run(tmp_path / "b", 3, resume=str(tmp_path / "a" / "model000002.pt"))
    a, b = load_file(str(tmp_path / "a" / "model000003.pt")), load_file(str(tmp_path / "b" / "model000003.pt"))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    with open(tmp_path / "a" / "progress.csv") as f:
        header = f.readline()
    assert "train_acc@1" in header and "train_acc@5" in header and "train_loss" in header


def test_fused_cpu_adamw_step_equals_jittor_adamw_over_several_steps_with_weight_decay(monkeypatch):
    rng = np.random.RandomState(4)
    init = [rng.randn(300, 257).astype(np.float32), rng.randn(7).astype(np.float32)]  # one multi-threaded, one not
    grads = [[rng.randn(*a.shape).astype(np.float32) for a in init] for _ in range(3)]
    results = []
    for fused in (True, False):
        params = [jt.array(a) for a in init]
        opt = AdamW(params, lr=3e-2, weight_decay=0.1)
        if not fused:
            monkeypatch.setattr(cpu, "fast_cpu_path", lambda *vs: False)  # Jittor's own AdamW.step
        for step_grads in grads:
            opt.step_with_grads(params, [jt.array(g) for g in step_grads])
        results.append([p.numpy() for p in params] + [m.numpy() for m in opt.param_groups[0]["m"]])
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert not np.allclose(results[0][0], init[0])


class _PoisonedDiffusion:
    """The tiny diffusion, whose loss terms turn NaN from training step `at` on (counted by calls)."""

    def __init__(self, base, at):
        self.base, self.at, self.calls = base, at, 0
        self.num_timesteps = base.num_timesteps

    def training_losses(self, model, x, t, model_kwargs=None, noise=None):
        self.calls += 1
        losses = self.base.training_losses(model, x, t, model_kwargs=model_kwargs, noise=noise)
        if self.calls >= self.at:
            losses = dict(losses, loss=losses["loss"] * float("nan"), mse=losses["mse"] * float("nan"))
        return losses


def test_a_nan_loss_stops_the_run_naming_the_step_terms_and_last_good_checkpoint(tmp_path):
    model, diffusion = tiny_model_and_diffusion()
    data = load_data(data_dir=make_images(tmp_path / "imgs"), batch_size=2, image_size=32, class_cond=True)
    with logger.scoped_configure(dir=str(tmp_path / "run"), format_strs=["log"]):
        loop = TrainLoop(model=model, diffusion=_PoisonedDiffusion(diffusion, at=3), data=data, batch_size=2,
                         microbatch=-1, lr=1e-3, ema_rate="0.9", log_interval=1, save_interval=2,
                         resume_checkpoint="", lr_anneal_steps=6)
        with pytest.raises(TrainingDiverged) as info:
            loop.run_loop()
    data.close()
    message = str(info.value)
    print(message)
    assert "at step 3" in message and "loss, mse" in message and "vb" not in message
    assert str(tmp_path / "run" / "model000002.pt") in message
    assert sorted(f for f in os.listdir(tmp_path / "run") if f.endswith(".pt")) == [
        "ema_0.9_000002.pt", "model000002.pt", "opt000002.pt"]  # nothing from the NaN step


def test_weights_gone_non_finite_are_never_saved(tmp_path):
    model, diffusion = tiny_model_and_diffusion()
    data = load_data(data_dir=make_images(tmp_path / "imgs"), batch_size=2, image_size=32, class_cond=True)
    with logger.scoped_configure(dir=str(tmp_path / "run"), format_strs=["log"]):
        loop = TrainLoop(model=model, diffusion=diffusion, data=data, batch_size=2, microbatch=-1, lr=1e-3,
                         ema_rate="0.9", log_interval=1, save_interval=1, resume_checkpoint="", lr_anneal_steps=1)
        loop.mp_trainer.master_params[0].assign(loop.mp_trainer.master_params[0] * float("inf"))
        with pytest.raises(TrainingDiverged, match=r"weights went non-finite \(NaN or inf\) by step 0"):
            loop.save()
    data.close()
    assert not [f for f in os.listdir(tmp_path / "run") if f.endswith(".pt")]


def test_a_model_file_without_its_ema_or_optimizer_is_refused_and_a_released_one_starts_at_step_0(tmp_path):
    data_dir = make_images(tmp_path / "imgs")
    train(tmp_path / "a", data_dir, steps=2)
    os.remove(tmp_path / "a" / "ema_0.99_000002.pt")
    with pytest.raises(CheckpointError, match="incomplete.*ema_0.99_000002.pt"):
        train(tmp_path / "b", data_dir, steps=3, resume=str(tmp_path / "a" / "model000002.pt"))
    # a file not named modelNNNNNN.pt (e.g. a released checkpoint) is fine-tuned from step 0 with a notice
    os.rename(tmp_path / "a" / "model000002.pt", tmp_path / "a" / "released.pt")
    loop = train(tmp_path / "c", data_dir, steps=1, resume=str(tmp_path / "a" / "released.pt"))
    assert loop.resume_step == 0
    assert "is not a modelNNNNNN.pt of a run" in (tmp_path / "c" / "log.txt").read_text()


def test_rerunning_in_the_same_log_dir_continues_from_the_newest_whole_set(tmp_path, monkeypatch):
    data_dir = make_images(tmp_path / "imgs")
    train(tmp_path / "full", data_dir, steps=4)
    monkeypatch.setenv("DIFFUSION_TRAINING_TEST", "1")  # stop after the first save (step 2 of 4)
    train(tmp_path / "run", data_dir, steps=4)
    monkeypatch.delenv("DIFFUSION_TRAINING_TEST")
    # a set cut short after its EMA files (no model file) is ignored; the run continues from step 2
    (tmp_path / "run" / "ema_0.9_000003.pt").write_bytes(b"partial")
    loop = train(tmp_path / "run", data_dir, steps=4)
    assert loop.resume_step == 2
    assert "continuing the run in" in (tmp_path / "run" / "log.txt").read_text()
    a, b = load_file(str(tmp_path / "full" / "model000004.pt")), load_file(str(tmp_path / "run" / "model000004.pt"))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    with open(tmp_path / "run" / "progress.csv") as f:  # the continued run appended to the log, under its header
        rows = f.read().splitlines()
    header = rows[0].split(",")
    assert [r.split(",")[header.index("step")] for r in rows[1:]] == ["0", "1", "2", "3"]


def test_a_full_disk_while_saving_keeps_earlier_checkpoints_and_names_the_file(tmp_path, monkeypatch):
    import errno

    from guided_diffusion import checkpoint as ckpt_module

    data_dir = make_images(tmp_path / "imgs")
    monkeypatch.setenv("DIFFUSION_TRAINING_TEST", "1")
    train(tmp_path / "run", data_dir, steps=4)
    monkeypatch.delenv("DIFFUSION_TRAINING_TEST")
    before = {f: (tmp_path / "run" / f).read_bytes() for f in os.listdir(tmp_path / "run") if f.endswith(".pt")}
    real_fsync = os.fsync
    calls = []

    def full_after_the_first_file(fd):
        calls.append(fd)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(ckpt_module.os, "fsync", full_after_the_first_file)
    with pytest.raises(CheckpointError) as info:
        train(tmp_path / "run", data_dir, steps=4)
    message = str(info.value)
    print(message)
    assert "No space left on device" in message and "MB" in message and str(tmp_path / "run") in message
    after = {f: (tmp_path / "run" / f).read_bytes() for f in os.listdir(tmp_path / "run") if f.endswith(".pt")}
    assert after == before  # the step-4 EMA written before the failure was removed; no partial or temporary file
    assert not [f for f in os.listdir(tmp_path / "run") if f.endswith(".tmp")]


def test_max_steps_ends_with_a_whole_set_without_touching_the_lr_and_a_rerun_continues(tmp_path):
    data_dir = make_images(tmp_path / "imgs")
    train(tmp_path / "full", data_dir, steps=4, save_interval=100)
    loop = train(tmp_path / "run", data_dir, steps=4, save_interval=100, max_steps=2)
    assert loop.step == 2
    assert sorted(f for f in os.listdir(tmp_path / "run") if f.endswith(".pt")) == [
        "ema_0.99_000002.pt", "ema_0.9_000002.pt", "model000002.pt", "opt000002.pt"]
    # the lr follows --lr_anneal_steps 4: after 2 of 4 steps, as in the run annealed over 4 steps
    lr = load_file(str(tmp_path / "run" / "opt000002.pt"))["param_groups"][0]["lr"]
    assert lr == pytest.approx(1e-3 * (1 - 1 / 4))
    train(tmp_path / "run", data_dir, steps=4, save_interval=100)  # the same command without --max_steps
    a, b = load_file(str(tmp_path / "full" / "model000004.pt")), load_file(str(tmp_path / "run" / "model000004.pt"))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
