"""
The diffusion training loop (the reference's TrainLoop): microbatches, EMA, fp16 loss scaling, AdamW, logging,
checkpoints and exact resumption.

Differences from the reference, on purpose:

* Checkpoint numbers count the optimizer steps a file holds: ``model000100.pt`` is the state after 100 updates.
  Saves happen when that count is a multiple of ``save_interval`` (and at the end), never at step 0, so a resumed
  run never overwrites the checkpoint it resumed from (the reference rewrites it with post-step weights).
* Exact resumption. Every step ``g`` (counted across resumes) reseeds Python, numpy and Jittor from
  ``(seed, g)`` before drawing timesteps and noise, and the data iterator is moved to batch ``g``
  (image_datasets.BatchIterator.seek). Model, every EMA and the AdamW state (moments, step count, learning rate)
  are restored from the checkpoint files, so a resumed run continues exactly like an uninterrupted one.
* Optimizer files (``opt%06d.pt``) hold a torch-style AdamW state dict ({"state": {i: {"step", "exp_avg",
  "exp_avg_sq"}}, "param_groups": [...]}).
"""

import contextlib
import functools
import os
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

import jittor as jt
import numpy as np
from tqdm import tqdm

from . import checkpoint_sets, cpu, dist_util, logger, seeding, state_dicts
from .errors import CheckpointError, InputCheck, UserError
from .fp16_util import MixedPrecisionTrainer, sums_of_squares
from .nn import update_ema
from .resample import LossAwareSampler, UniformSampler
from .run_guard import RunGuard

# For ImageNet experiments, this was a good default value.
# We found that the lg_loss_scale quickly climbed to
# 20-21 within the first ~1K steps of training.
INITIAL_LOG_LOSS_SCALE = 20.0


class AdamW(jt.optim.AdamW):
    """Jittor's AdamW (decoupled weight decay, as torch's) stepped once per call with explicit gradients, with a
    torch-style state dict so that optimizer checkpoints restore exactly."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0):
        super().__init__(list(params), lr, eps=eps, betas=tuple(betas), weight_decay=weight_decay)
        for pg in self.param_groups:
            pg.setdefault("lr", lr)

    def step_with_grads(self, params: Sequence[jt.Var], grads: Sequence[jt.Var]) -> None:
        """One AdamW update with the given gradients (aligned with params)."""
        by_id = {id(p): g for p, g in zip(params, grads)}
        for pg in self.param_groups:
            pg["grads"] = [by_id[id(p)] if id(p) in by_id else jt.zeros_like(p) for p in pg["params"]]
        self.n_step += 1  # the bias-correction step count (Jittor counts backward() calls instead)
        tensors = [v for pg in self.param_groups for v in pg["params"] + pg["grads"]]
        if cpu.fast_cpu_path(*tensors):
            cpu.adamw_step(self.param_groups, self.n_step, dict(lr=self.lr, betas=self.betas, eps=self.eps,
                                                                weight_decay=self.weight_decay))
            return
        jt.optim.AdamW.step(self)

    def state_dict(self) -> Dict[str, Any]:
        """{"state": per-parameter moments and step, "param_groups": hyper-parameters}, as torch's AdamW."""
        state: Dict[int, Dict[str, Any]] = {}
        groups = []
        index = 0
        for pg in self.param_groups:
            ids = []
            for p, m, v in zip(pg["params"], pg["m"], pg["values"]):
                if self.n_step > 0:
                    state[index] = {
                        "step": np.array(float(self.n_step), dtype=np.float32),
                        "exp_avg": np.array(m.numpy(), copy=True),
                        "exp_avg_sq": np.array(v.numpy(), copy=True),
                    }
                ids.append(index)
                index += 1
            groups.append({
                "lr": float(pg.get("lr", self.lr)),
                "betas": tuple(float(b) for b in pg.get("betas", self.betas)),
                "eps": float(pg.get("eps", self.eps)),
                "weight_decay": float(pg.get("weight_decay", self.weight_decay)),
                "amsgrad": False,
                "maximize": False,
                "foreach": None,
                "capturable": False,
                "differentiable": False,
                "fused": None,
                "params": ids,
            })
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: Mapping[str, Any], source: str = "optimizer checkpoint") -> None:
        """Restore moments, step count and hyper-parameters; a layout that does not fit raises CheckpointError."""
        try:
            groups = list(state_dict["param_groups"])
            state = state_dict["state"]
        except (KeyError, TypeError):
            raise CheckpointError("%s is not an AdamW state dict: delete it or resume without it" % source)
        if len(groups) != len(self.param_groups) or any(
            len(g["params"]) != len(pg["params"]) for g, pg in zip(groups, self.param_groups)
        ):
            raise CheckpointError(
                "%s has %s parameters, the optimizer %s: it belongs to another model (or to a run with another "
                "--use_fp16 setting, whose optimizer holds flattened parameters)"
                % (source, [len(g["params"]) for g in groups], [len(pg["params"]) for pg in self.param_groups])
            )
        n_step = 0
        for g, pg in zip(groups, self.param_groups):
            for i, (key, p) in enumerate(zip(g["params"], pg["params"])):
                s = state.get(key, state.get(str(key)))
                if s is None:
                    continue
                m, v = np.asarray(s["exp_avg"]), np.asarray(s["exp_avg_sq"])
                if tuple(m.shape) != tuple(p.shape) or tuple(v.shape) != tuple(p.shape):
                    raise CheckpointError("%s: state of parameter %d has shape %s, the parameter %s: it belongs "
                                          "to another model" % (source, key, m.shape, tuple(p.shape)))
                pg["m"][i] = jt.array(m.astype(np.float32)).stop_grad()
                pg["values"][i] = jt.array(v.astype(np.float32)).stop_grad()
                n_step = int(round(float(np.asarray(s["step"]).reshape(-1)[0])))
            for k in ("lr", "eps", "weight_decay"):
                if k in g:
                    pg[k] = float(g[k])
            if "betas" in g:
                pg["betas"] = tuple(float(b) for b in g["betas"])
        self.n_step = n_step


def _to_numpy(x) -> np.ndarray:
    return x.numpy() if isinstance(x, jt.Var) else np.asarray(x)


def _to_var(x, dtype: Optional[str] = None) -> jt.Var:
    v = x if isinstance(x, jt.Var) else jt.array(np.asarray(x))
    return v.cast(dtype) if dtype is not None and v.dtype != dtype else v


# The first key of each random stream of a training run (seeding.derive_seed keys).
_INIT_STREAM, _STEP_STREAM = 0, 1


def seed_training_step(seed: int, step: int) -> None:
    """Seed Python, numpy and Jittor for training step `step` on this rank, so its draws (timesteps, noise,
    dropout) depend on (seed, step, rank) alone: the same after a resume, different on every rank and step."""
    seeding.seed_all(_STEP_STREAM, seed, step, dist_util.get_rank())


@contextlib.contextmanager
def seeded_initialisation(seed: int):
    """Build models inside this block: their random initial weights then depend on `seed` alone (on every rank).

    Jittor draws random numbers when an op executes, so the new model's initial values are drawn before the block
    ends.
    """
    seeding.seed_all(_INIT_STREAM, seed)
    yield
    jt.sync_all()


SCHEDULE_SAMPLERS = ("uniform", "loss-second-moment")


def check_training_flags(check: InputCheck, args) -> None:
    """Record, in `check`, the problems of the flags the ADM training scripts share (before anything is built)."""
    for flag in ("batch_size", "log_interval", "save_interval", "iterations", "eval_interval"):
        if hasattr(args, flag) and getattr(args, flag) < 1:
            check.problem("--%s must be at least 1 (got %d)" % (flag, getattr(args, flag)))
    if getattr(args, "microbatch", -1) == 0 or getattr(args, "microbatch", -1) < -1:
        check.problem("--microbatch must be -1 (no split) or at least 1 (got %d)" % args.microbatch)
    if getattr(args, "lr", 0.0) < 0 or getattr(args, "weight_decay", 0.0) < 0:
        check.problem("--lr and --weight_decay must not be negative (got %g, %g)" % (args.lr, args.weight_decay))
    if getattr(args, "lr_anneal_steps", 0) < 0:
        check.problem("--lr_anneal_steps must be 0 (train forever) or positive (got %d)" % args.lr_anneal_steps)
    if hasattr(args, "ema_rate"):
        try:
            rates = parse_ema_rates(args.ema_rate)
        except ValueError:
            rates = []
        if not rates or not all(0.0 <= r < 1.0 for r in rates):
            check.problem("--ema_rate %r must be comma-separated rates in [0, 1), e.g. 0.9999 or 0.9999,0.999"
                          % (args.ema_rate,))
    if getattr(args, "schedule_sampler", "uniform") not in SCHEDULE_SAMPLERS:
        check.problem("unknown --schedule_sampler %r: use %s" % (args.schedule_sampler, " or ".join(SCHEDULE_SAMPLERS)))
    if getattr(args, "resume_checkpoint", ""):
        check(check_resume_checkpoint, args.resume_checkpoint)


def check_resume_checkpoint(path: str) -> None:
    """Refuse a --resume_checkpoint that is not an existing file."""
    if not os.path.isfile(path):
        raise CheckpointError("--resume_checkpoint %r does not exist: pass the path of a model%%06d.pt file "
                              "written by a previous run" % path)


def parse_ema_rates(ema_rate: Union[float, str, Sequence[float]]) -> List[float]:
    """ "0.9999,0.999" -> [0.9999, 0.999] (a float becomes a one-element list)."""
    if isinstance(ema_rate, (float, int)):
        return [float(ema_rate)]
    if isinstance(ema_rate, str):
        return [float(x) for x in ema_rate.split(",") if x.strip()]
    return [float(x) for x in ema_rate]


def batch_to_vars(batch, cond: Mapping[str, Any]):
    """Numpy batches from the data loaders as Jittor Vars (labels become int32)."""
    return _to_var(batch, "float32"), {k: _to_var(v) for k, v in cond.items()}


class TrainLoop:
    """Trains a diffusion model: see the module docstring for checkpoints and resumption."""

    def __init__(
        self,
        *,
        model,
        diffusion,
        data,
        batch_size: int,
        microbatch: int,
        lr: float,
        ema_rate,
        log_interval: int,
        save_interval: int,
        resume_checkpoint: str,
        use_fp16: bool = False,
        fp16_scale_growth: float = 1e-3,
        schedule_sampler=None,
        weight_decay: float = 0.0,
        lr_anneal_steps: int = 0,
        seed: int = 0,
    ):
        self.model = model
        self.diffusion = diffusion
        self.data = data
        self.batch_size = batch_size
        self.microbatch = microbatch if microbatch > 0 else batch_size
        self.lr = lr
        self.ema_rate = parse_ema_rates(ema_rate)
        self.log_interval = log_interval
        self.save_interval = save_interval
        self.resume_checkpoint = resume_checkpoint
        self.use_fp16 = use_fp16
        self.fp16_scale_growth = fp16_scale_growth
        self.schedule_sampler = schedule_sampler or UniformSampler(diffusion)
        self.weight_decay = weight_decay
        self.lr_anneal_steps = lr_anneal_steps
        self.seed = seed

        self.step = 0
        self.resume_step = 0
        self.global_batch = self.batch_size * dist_util.get_world_size()

        self.resumed_from = self._load_and_sync_parameters()
        self.guard = RunGuard(log=logger.log, last_checkpoint=self.resumed_from)
        self.mp_trainer = MixedPrecisionTrainer(
            model=self.model,
            use_fp16=self.use_fp16,
            fp16_scale_growth=fp16_scale_growth,
        )

        self.opt = AdamW(self.mp_trainer.master_params, lr=self.lr, weight_decay=self.weight_decay)
        self._step_losses: Dict[str, List[float]] = {}
        if self.resume_step:
            self._load_optimizer_state()
            # Model was resumed, either due to a restart or a checkpoint being specified at the command line.
            self.ema_params = [self._load_ema_parameters(rate) for rate in self.ema_rate]
            if hasattr(self.data, "seek"):
                self.data.seek(self.resume_step)
        else:
            self.ema_params = [self._copy_params(self.mp_trainer.master_params) for _ in range(len(self.ema_rate))]


    @staticmethod
    def _copy_params(params: Sequence[jt.Var]) -> List[jt.Var]:
        return [jt.array(np.array(p.numpy(), copy=True)).stop_grad() for p in params]

    def _load_and_sync_parameters(self) -> Optional[str]:
        """Load --resume_checkpoint, else the newest whole set in the log dir (a rerun continues); return it."""
        resume_checkpoint = self.resume_checkpoint or find_resume_checkpoint(get_blob_logdir(), self.ema_rate)
        if resume_checkpoint and not self.resume_checkpoint:
            logger.log(f"continuing the run in {get_blob_logdir()} from its newest complete checkpoint set: "
                       f"{os.path.basename(resume_checkpoint)} (pass --resume_checkpoint to choose another)")
        if resume_checkpoint:
            check_resume_checkpoint(resume_checkpoint)
            step = parse_resume_step_from_filename(resume_checkpoint)
            if step:
                checkpoint_sets.check_whole_set(resume_checkpoint, step, self.ema_rate)
            self.resume_step = load_resume_checkpoint(self.model, resume_checkpoint)
            if not self.resume_step:
                logger.log(f"notice: {resume_checkpoint} is not a modelNNNNNN.pt of a run (e.g. a released "
                           f"checkpoint): training starts from its weights at step 0, with the EMA starting from "
                           f"them and a fresh optimizer")
        dist_util.sync_params(self.model.parameters())
        self.resume_checkpoint = resume_checkpoint or ""
        return resume_checkpoint

    def _load_ema_parameters(self, rate: float) -> List[jt.Var]:
        ema_checkpoint = os.path.join(os.path.dirname(self.resume_checkpoint),
                                      checkpoint_sets.ema_name(rate, self.resume_step))
        logger.log(f"loading EMA from checkpoint: {ema_checkpoint}...")
        state_dict = dist_util.load_state_dict(ema_checkpoint, map_location=dist_util.dev())
        ema_params = [p.stop_grad() for p in
                      self.mp_trainer.state_dict_to_master_params(state_dict, source=ema_checkpoint)]
        dist_util.sync_params(ema_params)
        return ema_params

    def _load_optimizer_state(self) -> None:
        opt_checkpoint = os.path.join(os.path.dirname(self.resume_checkpoint),
                                      checkpoint_sets.opt_name(self.resume_step))
        logger.log(f"loading optimizer state from checkpoint: {opt_checkpoint}")
        state_dict = dist_util.load_state_dict(opt_checkpoint, map_location=dist_util.dev())
        self.opt.load_state_dict(state_dict, source=opt_checkpoint)
        if "lg_loss_scale" in state_dict:  # the fp16 loss scale, so that a resumed fp16 run continues exactly
            self.mp_trainer.lg_loss_scale = float(np.asarray(state_dict["lg_loss_scale"]).reshape(-1)[0])

    def run_loop(self) -> None:
        """Train until lr_anneal_steps (forever when 0), logging and saving at the configured intervals."""
        progress = tqdm(total=self.lr_anneal_steps or None, initial=self.resume_step, desc="training",
                        unit="step", disable=not dist_util.is_main_process(), dynamic_ncols=True)
        with self.guard:
            while not self.lr_anneal_steps or self.step + self.resume_step < self.lr_anneal_steps:
                batch, cond = next(self.data)
                self.run_step(batch, cond)
                progress.update(1)
                if (self.step + self.resume_step) % self.log_interval == 0:
                    logger.dumpkvs()
                self.step += 1
                done = self.step + self.resume_step
                stop = self.guard.after_step(done, {k: float(np.mean(v)) for k, v in self._step_losses.items()})
                if done % self.save_interval == 0 or stop:
                    path = self.save()
                    if stop:
                        progress.close()
                        self.guard.exit_after_save(done, path)
                    # Run for a finite amount of time in integration tests.
                    if os.environ.get("DIFFUSION_TRAINING_TEST", "") and self.step > 0:
                        progress.close()
                        return
        progress.close()
        # Save the last checkpoint if it wasn't already saved.
        if self.step > 0 and (self.step + self.resume_step) % self.save_interval != 0:
            self.save()

    def run_step(self, batch, cond) -> None:
        """One optimizer step on a batch (numpy or Vars), seeded from the global step number."""
        step = self.step + self.resume_step
        seed_training_step(self.seed, step)
        self.forward_backward(batch, cond)
        took_step = self.mp_trainer.optimize(self.opt)
        if took_step:
            self.guard.took_step()
            self._update_ema()
        elif self.mp_trainer.use_fp16:
            self.guard.skipped_step(step + 1, self.mp_trainer.lg_loss_scale)
        else:
            self.guard.nonfinite_gradients(step + 1, {k: float(np.mean(v)) for k, v in self._step_losses.items()})
        self._anneal_lr()
        self.log_step()
        jt.sync(self._state_vars())

    def _state_vars(self) -> List[jt.Var]:
        out = list(self.mp_trainer.master_params) + list(self.mp_trainer.model_params)
        for params in self.ema_params:
            out.extend(params)
        for pg in self.opt.param_groups:
            out.extend(pg["m"])
            out.extend(pg["values"])
        return out

    def forward_backward(self, batch, cond) -> None:
        """Accumulate the gradients of the weighted diffusion loss over the microbatches of a batch."""
        self.mp_trainer.zero_grad()
        self._step_losses = {}
        batch = _to_numpy(batch) if not isinstance(batch, jt.Var) else batch
        n = batch.shape[0]
        for i in range(0, n, self.microbatch):
            micro, micro_cond = batch_to_vars(batch[i: i + self.microbatch],
                                              {k: v[i: i + self.microbatch] for k, v in cond.items()})
            micro_n = micro.shape[0]
            t, weights = self.schedule_sampler.sample(micro_n, dist_util.dev())
            t = _to_var(t, "int32")
            weights = _to_var(weights, "float32")

            compute_losses = functools.partial(
                self.diffusion.training_losses,
                self.model,  # Jittor averages gradients over MPI ranks itself (see MixedPrecisionTrainer)
                micro,
                t,
                model_kwargs=micro_cond,
            )
            losses = compute_losses()

            loss = (losses["loss"] * weights).mean()
            weighted = {k: v * weights for k, v in losses.items()}
            self.mp_trainer.backward(loss)

            jt.sync([losses["loss"]] + list(weighted.values()))
            if isinstance(self.schedule_sampler, LossAwareSampler):
                self.schedule_sampler.update_with_local_losses(t, losses["loss"].detach())
            log_loss_dict(self.diffusion, t, weighted)
            for k, v in weighted.items():
                self._step_losses.setdefault(k, []).append(float(v.numpy().mean()))

    def _update_ema(self) -> None:
        for rate, params in zip(self.ema_rate, self.ema_params):
            update_ema(params, self.mp_trainer.master_params, rate=rate)

    def _anneal_lr(self) -> None:
        if not self.lr_anneal_steps:
            return
        frac_done = (self.step + self.resume_step) / self.lr_anneal_steps
        lr = self.lr * (1 - frac_done)
        for param_group in self.opt.param_groups:
            param_group["lr"] = lr

    def log_step(self) -> None:
        logger.logkv("step", self.step + self.resume_step)
        logger.logkv("samples", (self.step + self.resume_step + 1) * self.global_batch)
        log_bad_images(self.data)

    def save(self) -> Optional[str]:
        """Write ema_<rate>_N.pt, optN.pt and modelN.pt (N = optimizer steps done) into the log dir (rank 0).

        Weights that went non-finite are never written; the model file comes last (see checkpoint_sets).
        Returns the model file's path.
        """
        step = self.step + self.resume_step
        tensors = list(self.mp_trainer.master_params) + [p for params in self.ema_params for p in params]
        self.guard.check_finite_weights(step, sums_of_squares(tensors))
        files = []
        if dist_util.is_main_process():
            # Numpy copies first (Jittor ops run on every rank), then the files.
            for rate, params in zip(self.ema_rate, self.ema_params):
                files.append((checkpoint_sets.ema_name(rate, step), self.mp_trainer.master_params_to_state_dict(params)))
            opt_state = self.opt.state_dict()
            if self.mp_trainer.use_fp16:
                opt_state["lg_loss_scale"] = float(self.mp_trainer.lg_loss_scale)
            files.append((checkpoint_sets.opt_name(step), opt_state))
            files.append((checkpoint_sets.model_name(step),
                          self.mp_trainer.master_params_to_state_dict(self.mp_trainer.master_params)))
        path = os.path.join(get_blob_logdir(), checkpoint_sets.model_name(step))
        save_on_main_process(lambda: checkpoint_sets.write_set(get_blob_logdir(), files, log=logger.log))
        self.guard.saved(path)
        return path


class ClassifierTrainLoop:
    """Trains a (noise-aware) classifier as the reference's classifier_train.py: cross-entropy on q_sample(x, t)
    inputs (plain inputs when noised is False), optional lr annealing, validation, top-1/top-5 logs, model + opt
    checkpoints (numbered by optimizer steps done, like TrainLoop) and exact resumption."""

    def __init__(
        self,
        *,
        model,
        diffusion,
        data,
        val_data=None,
        batch_size: int,
        microbatch: int = -1,
        lr: float = 3e-4,
        weight_decay: float = 0.0,
        anneal_lr: bool = False,
        iterations: int = 150000,
        noised: bool = True,
        schedule_sampler=None,
        resume_checkpoint: str = "",
        log_interval: int = 10,
        eval_interval: int = 5,
        save_interval: int = 10000,
        use_fp16: bool = False,
        seed: int = 0,
    ):
        self.model = model
        self.diffusion = diffusion
        self.data = data
        self.val_data = val_data
        self.batch_size = batch_size
        self.microbatch = microbatch
        self.lr = lr
        self.anneal_lr = anneal_lr
        self.iterations = iterations
        self.noised = noised
        self.schedule_sampler = schedule_sampler or (UniformSampler(diffusion) if noised else None)
        self.log_interval = log_interval
        self.eval_interval = eval_interval
        self.save_interval = save_interval
        self.seed = seed

        self.resume_step = 0
        explicit = bool(resume_checkpoint)
        resume_checkpoint = resume_checkpoint or find_resume_checkpoint(logger.get_dir())
        if resume_checkpoint and not explicit:
            logger.log(f"continuing the run in {logger.get_dir()} from its newest complete checkpoint set: "
                       f"{os.path.basename(resume_checkpoint)} (pass --resume_checkpoint to choose another)")
        if resume_checkpoint:
            check_resume_checkpoint(resume_checkpoint)
            step = parse_resume_step_from_filename(resume_checkpoint)
            if step:
                checkpoint_sets.check_whole_set(resume_checkpoint, step, ())
            self.resume_step = load_resume_checkpoint(self.model, resume_checkpoint, log_step=True)
        dist_util.sync_params(self.model.parameters())
        self.guard = RunGuard(log=logger.log, last_checkpoint=resume_checkpoint or None)

        self.mp_trainer = MixedPrecisionTrainer(model=self.model, use_fp16=use_fp16, initial_lg_loss_scale=16.0)
        self.opt = AdamW(self.mp_trainer.master_params, lr=lr, weight_decay=weight_decay)
        self._step_losses: Dict[str, float] = {}
        if self.resume_step:
            opt_checkpoint = os.path.join(os.path.dirname(resume_checkpoint), checkpoint_sets.opt_name(self.resume_step))
            logger.log(f"loading optimizer state from checkpoint: {opt_checkpoint}")
            state_dict = dist_util.load_state_dict(opt_checkpoint, map_location=dist_util.dev())
            self.opt.load_state_dict(state_dict, source=opt_checkpoint)
            if "lg_loss_scale" in state_dict:
                self.mp_trainer.lg_loss_scale = float(np.asarray(state_dict["lg_loss_scale"]).reshape(-1)[0])
            if hasattr(self.data, "seek"):
                self.data.seek(self.resume_step)
            if self.val_data is not None and hasattr(self.val_data, "seek"):
                self.val_data.seek(-(-self.resume_step // self.eval_interval))

    def forward_backward_log(self, data_loader, prefix: str = "train") -> None:
        """Loss and top-1/top-5 accuracy of one batch, logged per quartile; gradients only for "train"."""
        batch, extra = next(data_loader)
        batch, extra = batch_to_vars(batch, extra)
        labels = extra["y"]
        if self.noised:
            t, _ = self.schedule_sampler.sample(batch.shape[0], dist_util.dev())
            t = _to_var(t, "int32")
            batch = self.diffusion.q_sample(batch, t)
        else:
            t = jt.zeros(batch.shape[0], "int32")

        for i, (sub_batch, sub_labels, sub_t) in enumerate(
            split_microbatches(self.microbatch, batch, labels, t)
        ):
            logits = self.model(sub_batch, timesteps=sub_t)
            loss = cross_entropy(logits, sub_labels)
            if prefix == "train":
                if i == 0:
                    self.mp_trainer.zero_grad()
                self.mp_trainer.backward(loss.mean() * (sub_batch.shape[0] / batch.shape[0]))
            logits_np = logits.numpy()
            labels_np = sub_labels.numpy()
            losses = {
                f"{prefix}_loss": loss.numpy(),
                f"{prefix}_acc@1": compute_top_k(logits_np, labels_np, k=1, reduction="none"),
                f"{prefix}_acc@5": compute_top_k(logits_np, labels_np, k=5, reduction="none"),
            }
            log_loss_dict(self.diffusion, sub_t, losses)
            if prefix == "train":
                self._step_losses["train_loss"] = float(np.mean(losses["train_loss"]))

    def run_loop(self) -> None:
        """Train for `iterations` optimizer steps in total (counting the resumed ones)."""
        step = self.resume_step
        progress = tqdm(total=self.iterations, initial=step, desc="training classifier", unit="step",
                        disable=not dist_util.is_main_process(), dynamic_ncols=True)
        with self.guard:
            while step < self.iterations:
                seed_training_step(self.seed, step)
                logger.logkv("step", step)
                logger.logkv("samples", (step + 1) * self.batch_size * dist_util.get_world_size())
                log_bad_images(self.data)
                if self.anneal_lr:
                    set_annealed_lr(self.opt, self.lr, step / self.iterations)
                self.forward_backward_log(self.data)
                if self.mp_trainer.optimize(self.opt):
                    self.guard.took_step()
                elif self.mp_trainer.use_fp16:
                    self.guard.skipped_step(step + 1, self.mp_trainer.lg_loss_scale)
                else:
                    self.guard.nonfinite_gradients(step + 1, self._step_losses)
                if self.val_data is not None and step % self.eval_interval == 0:
                    with jt.no_grad():
                        self.model.eval()
                        self.forward_backward_log(self.val_data, prefix="val")
                        self.model.train()
                if step % self.log_interval == 0:
                    logger.dumpkvs()
                jt.sync(list(self.mp_trainer.master_params) + [v for pg in self.opt.param_groups
                                                                for v in pg["m"] + pg["values"]])
                step += 1
                progress.update(1)
                stop = self.guard.after_step(step, self._step_losses)
                if step % self.save_interval == 0 or step == self.iterations or stop:
                    path = self.save(step)
                    if stop:
                        progress.close()
                        self.guard.exit_after_save(step, path)
        progress.close()

    def save(self, step: int) -> str:
        """Write optNNNNNN.pt then modelNNNNNN.pt (rank 0; never non-finite weights); returns the model file."""
        self.guard.check_finite_weights(step, sums_of_squares(list(self.mp_trainer.master_params)))
        files = []
        if dist_util.is_main_process():
            opt_state = self.opt.state_dict()
            if self.mp_trainer.use_fp16:
                opt_state["lg_loss_scale"] = float(self.mp_trainer.lg_loss_scale)
            files = [(checkpoint_sets.opt_name(step), opt_state),
                     (checkpoint_sets.model_name(step),
                      self.mp_trainer.master_params_to_state_dict(self.mp_trainer.master_params))]
        save_on_main_process(lambda: checkpoint_sets.write_set(logger.get_dir(), files, log=logger.log))
        path = os.path.join(logger.get_dir(), checkpoint_sets.model_name(step))
        self.guard.saved(path)
        return path


def set_annealed_lr(opt, base_lr: float, frac_done: float) -> None:
    """Linearly decay the learning rate of every parameter group to 0 at frac_done = 1."""
    lr = base_lr * (1 - frac_done)
    for param_group in opt.param_groups:
        param_group["lr"] = lr


def cross_entropy(logits: jt.Var, labels: jt.Var) -> jt.Var:
    """Per-sample cross-entropy (torch's F.cross_entropy with reduction="none")."""
    logits = logits.float32()
    m = logits.max(dim=-1, keepdims=True)
    logp = logits - m - jt.log(jt.exp(logits - m).sum(dim=-1, keepdims=True))
    onehot = jt.nn.one_hot(labels.int32(), logits.shape[-1]).float32()
    return -(logp * onehot).sum(dim=-1)


def compute_top_k(logits, labels, k: int, reduction: str = "mean"):
    """1.0 where the label is among the k largest logits (numpy), averaged unless reduction="none"."""
    logits = _to_numpy(logits)
    labels = _to_numpy(labels).reshape(-1)
    k = min(k, logits.shape[-1])
    top_ks = np.argsort(-logits, axis=-1, kind="stable")[:, :k]
    hits = (top_ks == labels[:, None]).any(axis=-1).astype(np.float32)
    if reduction == "mean":
        return float(hits.mean())
    elif reduction == "none":
        return hits
    raise ValueError("reduction must be mean or none")


def split_microbatches(microbatch: int, *args):
    """Yield aligned slices of the arrays in args, microbatch at a time (all of them when microbatch is -1)."""
    bs = args[0].shape[0]
    if microbatch == -1 or microbatch >= bs:
        yield tuple(args)
    else:
        for i in range(0, bs, microbatch):
            yield tuple(x[i: i + microbatch] if x is not None else None for x in args)


def load_resume_checkpoint(model, resume_checkpoint: str, log_step: bool = False) -> int:
    """Load --resume_checkpoint strictly into `model`; returns the step parsed from its file name."""
    check_resume_checkpoint(resume_checkpoint)
    resume_step = parse_resume_step_from_filename(resume_checkpoint)
    logger.log(f"loading model from checkpoint: {resume_checkpoint}..."
               + (f" at {resume_step} step" if log_step else ""))
    state_dicts.load_state_dict_strict(
        model, dist_util.load_state_dict(resume_checkpoint, map_location=dist_util.dev()), source=resume_checkpoint
    )
    return resume_step


def parse_resume_step_from_filename(filename: str) -> int:
    """Parse filenames of the form path/to/modelNNNNNN.pt, where NNNNNN is the checkpoint's number of steps."""
    split = filename.split("model")
    if len(split) < 2:
        return 0
    split1 = split[-1].split(".")[0]
    try:
        return int(split1)
    except ValueError:
        return 0


def get_blob_logdir() -> str:
    """Where checkpoints are written: the logger's directory."""
    # You can change this to be a separate path to save checkpoints to
    # a blobstore or some external drive.
    return logger.get_dir()


def find_resume_checkpoint(log_dir: Optional[str] = None, ema_rates: Sequence[float] = ()) -> Optional[str]:
    """The newest whole checkpoint set's model file in log_dir, so that rerunning a command continues its run.

    (The reference's hook for automatic resumption; override it for checkpoints kept elsewhere.)
    """
    found = checkpoint_sets.newest_whole_set(log_dir, ema_rates) if log_dir else None
    return found[0] if found else None


def save_on_main_process(write: Callable[[], Any]) -> None:
    """Run `write` on rank 0 and let every rank know whether it worked, so a failed save stops all ranks together
    (instead of leaving the others waiting at a barrier)."""
    failure: Optional[BaseException] = None
    if dist_util.is_main_process():
        try:
            write()
        except Exception as exc:  # re-raised below, after the other ranks learn of it
            failure = exc
    failed = dist_util.all_reduce_sum_array(np.array([failure is not None], dtype=np.int64))
    if failure is not None:
        raise failure
    if failed[0]:
        raise UserError("rank 0 could not write the checkpoint (see its error in log.txt); the earlier checkpoints "
                        "are intact")


def log_bad_images(data) -> None:
    """Log how many unreadable images the data iterator skipped so far (when it skipped any)."""
    bad = getattr(data, "bad_images", 0)
    if bad:
        logger.logkv("bad_images", bad)


def find_ema_checkpoint(main_checkpoint: Optional[str], step: int, rate: float) -> Optional[str]:
    """The ema_<rate>_<step>.pt beside main_checkpoint, if it exists."""
    if main_checkpoint is None:
        return None
    filename = f"ema_{rate}_{(step):06d}.pt"
    path = os.path.join(os.path.dirname(main_checkpoint), filename)
    if os.path.exists(path):
        return path
    return None


def log_loss_dict(diffusion, ts, losses: Mapping[str, Any]) -> None:
    """logkv_mean every loss term, overall and per quarter of the diffusion process (key_q0 .. key_q3)."""
    ts = _to_numpy(ts).reshape(-1)
    for key, values in losses.items():
        values = _to_numpy(values).reshape(-1)
        logger.logkv_mean(key, float(values.mean()))
        # Log the quantiles (four quartiles, in particular).
        for sub_t, sub_loss in zip(ts, values):
            quartile = int(4 * int(sub_t) / diffusion.num_timesteps)
            logger.logkv_mean(f"{key}_q{quartile}", float(sub_loss))


#: The flags of the ADM training scripts that TrainLoop and ClassifierTrainLoop take under the same name.
TRAIN_LOOP_FLAGS = ("batch_size", "microbatch", "lr", "ema_rate", "log_interval", "save_interval",
                    "resume_checkpoint", "use_fp16", "fp16_scale_growth", "weight_decay", "lr_anneal_steps", "seed")
CLASSIFIER_LOOP_FLAGS = ("batch_size", "microbatch", "lr", "weight_decay", "anneal_lr", "iterations", "noised",
                         "resume_checkpoint", "log_interval", "eval_interval", "save_interval", "seed")


def train_loop_from_args(args, model, diffusion, data, schedule_sampler=None) -> TrainLoop:
    """The TrainLoop of the ADM training scripts (image_train, free_train, super_res_train) from their flags."""
    flags = {name: getattr(args, name) for name in TRAIN_LOOP_FLAGS}
    return TrainLoop(model=model, diffusion=diffusion, data=data, schedule_sampler=schedule_sampler, **flags)


def classifier_train_loop_from_args(args, model, diffusion, data, val_data=None,
                                    schedule_sampler=None) -> ClassifierTrainLoop:
    """The ClassifierTrainLoop of classifier_train.py from its flags (--classifier_use_fp16 is its use_fp16)."""
    flags = {name: getattr(args, name) for name in CLASSIFIER_LOOP_FLAGS}
    return ClassifierTrainLoop(model=model, diffusion=diffusion, data=data, val_data=val_data,
                               schedule_sampler=schedule_sampler, use_fp16=args.classifier_use_fp16, **flags)
