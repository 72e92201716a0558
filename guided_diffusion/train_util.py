"""
The ADM trainers (the reference's TrainLoop and ClassifierTrainLoop) as step functions on the training core
(guided_diffusion/training): microbatches, fp16 loss scaling and the diffusion or classification loss are here;
seeding, EMAs, the run guard, checkpoint sets and resumption are the core's.

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
* ``ema_std`` (off by default) adds EDM2's power-function EMAs, saved as ``phema_<std>_%06d.pt`` with every set
  (scripts/reconstruct_ema.py turns them into the EMA of any std afterwards).
"""

import contextlib
import functools
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import jittor as jt
import numpy as np

from . import dist_util, logger, state_dicts
from .errors import CheckpointError, InputCheck
from .fp16_util import MixedPrecisionTrainer
from .resample import LossAwareSampler, UniformSampler
from .run_guard import RunGuard
from .training.checkpoints import ADMLayout, CheckpointIO, save_on_main_process  # noqa: F401 (public here)
from .training.ema import EMA, MultiRateEMA, PowerFunctionEMA, ema_rate_name, ema_std_name, parse_ema_rates, \
    parse_ema_stds
from .training.loop import StepOutcome, TrainingLoop, seed_initialisation, stop_step
from .training.loop import seed_training_step  # noqa: F401 (public here, as before)
from .training.optim import AdamW, linear_anneal_lr as set_annealed_lr  # noqa: F401 (the reference's names)
from .training.phema import MAX_STD
from .training.preview import PreviewGrid, preview_labels


def _to_numpy(x) -> np.ndarray:
    return x.numpy() if isinstance(x, jt.Var) else np.asarray(x)


def _to_var(x, dtype: Optional[str] = None) -> jt.Var:
    v = x if isinstance(x, jt.Var) else jt.array(np.asarray(x))
    return v.cast(dtype) if dtype is not None and v.dtype != dtype else v


@contextlib.contextmanager
def seeded_initialisation(seed: int):
    """Build models inside this block: their random initial weights then depend on `seed` alone (on every rank).

    Jittor draws random numbers when an op executes, so the new model's initial values are drawn before the block
    ends.
    """
    seed_initialisation(seed)
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
    if hasattr(args, "ema_std"):
        try:
            parse_ema_stds(args.ema_std)
        except ValueError as exc:
            check.problem("--ema_std %r must be comma-separated relative stds in (0, %g], e.g. 0.05,0.1 (%s)"
                          % (args.ema_std, MAX_STD, exc))
    if getattr(args, "max_steps", 0) < 0:
        check.problem("--max_steps must be 0 (no limit) or positive (got %d)" % args.max_steps)
    if getattr(args, "preview_interval", 0) < 0:
        check.problem("--preview_interval must be 0 (no previews) or positive (got %d)" % args.preview_interval)
    if getattr(args, "finetune_from", ""):
        if getattr(args, "resume_checkpoint", ""):
            check.problem("--finetune_from starts a new run at step 0 and --resume_checkpoint continues one: give "
                          "only one of them")
        elif not os.path.isfile(args.finetune_from):
            check.problem("--finetune_from %s: file not found; give a model checkpoint (.pt), e.g. a released one "
                          "(scripts/download_models.py) or a modelNNNNNN.pt / emaNNN.pt of a run" % args.finetune_from)
    if getattr(args, "schedule_sampler", "uniform") not in SCHEDULE_SAMPLERS:
        check.problem("unknown --schedule_sampler %r: use %s" % (args.schedule_sampler, " or ".join(SCHEDULE_SAMPLERS)))
    if getattr(args, "resume_checkpoint", ""):
        check(check_resume_checkpoint, args.resume_checkpoint)


def check_resume_checkpoint(path: str) -> None:
    """Refuse a --resume_checkpoint that is not an existing file."""
    if not os.path.isfile(path):
        raise CheckpointError("--resume_checkpoint %r does not exist: pass the path of a model%%06d.pt file "
                              "written by a previous run" % path)


def batch_to_vars(batch, cond: Mapping[str, Any]):
    """Numpy batches from the data loaders as Jittor Vars (labels become int32)."""
    return _to_var(batch, "float32"), {k: _to_var(v) for k, v in cond.items()}


class _ADMRun:
    """What both ADM trainers share: the model and its MixedPrecisionTrainer, AdamW, the averages, the checkpoint
    sets in the log dir (ADM layout) and resumption from them."""

    def _set_up(self, *, model, resume_checkpoint: str, ema_rates: Sequence[float], ema_stds: Sequence[float],
                released_notice: bool, log_step: bool, use_fp16: bool, lr: float, weight_decay: float,
                **mp_flags) -> None:
        """Resume the model (--resume_checkpoint, else the newest whole set in the log dir), build the trainer,
        the optimizer and the averages, then restore the rest of the set."""
        self.model = model
        names = [ema_rate_name(r) for r in ema_rates] + [ema_std_name(s) for s in ema_stds]
        self.guard = RunGuard(log=logger.log)
        self.checkpoints = CheckpointIO(get_blob_logdir(), ADMLayout(names), self.guard, log=logger.log)
        self.resume_checkpoint, self.resume_step = self._load_and_sync_parameters(
            resume_checkpoint, released_notice, log_step)
        self.guard.last_checkpoint = self.resume_checkpoint or None
        self.mp_trainer = MixedPrecisionTrainer(model=model, use_fp16=use_fp16, **mp_flags)
        self.opt = AdamW(self.mp_trainer.master_params, lr=lr, weight_decay=weight_decay)
        params = self.mp_trainer.master_params
        self.emas: List[EMA] = ([MultiRateEMA(params, ema_rates)] if ema_rates else []) + (
            [PowerFunctionEMA(params, ema_stds)] if ema_stds else [])
        if self.resume_step:
            self._restore_set()
            if hasattr(self.data, "seek"):
                self.data.seek(self.resume_step)

    def _load_and_sync_parameters(self, resume_checkpoint: str, released_notice: bool,
                                  log_step: bool) -> Tuple[str, int]:
        """Load --resume_checkpoint, else the newest whole set in the log dir (a rerun continues); return it and
        its step."""
        found = resume_checkpoint or (self.checkpoints.newest() or ("", 0))[0]
        if found and not resume_checkpoint:
            logger.log(f"continuing the run in {get_blob_logdir()} from its newest complete checkpoint set: "
                       f"{os.path.basename(found)} (pass --resume_checkpoint to choose another)")
        step = 0
        if found:
            check_resume_checkpoint(found)
            if parse_resume_step_from_filename(found):
                self.checkpoints.check_complete(found, parse_resume_step_from_filename(found))
            step = load_resume_checkpoint(self.model, found, log_step=log_step)
            if not step and released_notice:
                logger.log(f"notice: {found} is not a modelNNNNNN.pt of a run (e.g. a released checkpoint): "
                           f"training starts from its weights at step 0, with the EMA starting from them and a "
                           f"fresh optimizer")
        dist_util.sync_params(self.model.parameters())
        return found or "", step

    def _restore_set(self) -> None:
        """The optimizer (and fp16 loss scale) and every average of the set resumed from."""
        states = self.checkpoints.read(self.resume_checkpoint, self.resume_step)
        opt_path = os.path.join(os.path.dirname(self.resume_checkpoint), ADMLayout.opt_name(self.resume_step))
        self.opt.load_state_dict(states["opt"], source=opt_path)
        if "lg_loss_scale" in states["opt"]:  # the fp16 loss scale, so that a resumed fp16 run continues exactly
            self.mp_trainer.lg_loss_scale = float(np.asarray(states["opt"]["lg_loss_scale"]).reshape(-1)[0])
        for ema in self.emas:
            for name in ema.names:
                values = [p.stop_grad() for p in self.mp_trainer.state_dict_to_master_params(
                    states[name], source=os.path.join(os.path.dirname(self.resume_checkpoint), name))]
                dist_util.sync_params(values)
                ema.load(name, values)

    def _optimizer_vars(self) -> List[jt.Var]:
        return [v for pg in self.opt.param_groups for v in pg["m"] + pg["values"]]

    def _checkpoint_states(self) -> Dict[str, Any]:
        """Numpy copies of every state of a set (rank 0): the averages, the optimizer, the model."""
        states = {name: self.mp_trainer.master_params_to_state_dict(values)
                  for ema in self.emas for name, values in ema.state().items()}
        states["opt"] = self.opt.state_dict()
        if self.mp_trainer.use_fp16:
            states["opt"]["lg_loss_scale"] = float(self.mp_trainer.lg_loss_scale)
        states["model"] = self.mp_trainer.master_params_to_state_dict(self.mp_trainer.master_params)
        return states

    def first_average_state(self) -> Mapping[str, np.ndarray]:
        """The model's state dict holding the first average (the first --ema_rate; without one, the weights)."""
        params = self.emas[0].averages[0] if self.emas else self.mp_trainer.master_params
        return {k: (v.numpy() if isinstance(v, jt.Var) else np.asarray(v))
                for k, v in self.mp_trainer.master_params_to_state_dict(params).items()}

    def add_preview(self, interval: int, diffusion, classes: Optional[int] = None,
                    model_kwargs: Optional[Mapping[str, np.ndarray]] = None,
                    beside: Optional[np.ndarray] = None, shape: Optional[Sequence[int]] = None) -> None:
        """Every `interval` optimizer steps (0: never), write preview_%06d.png into the log dir: a grid sampled
        with the first average on `diffusion` (a respaced one, training.preview.PREVIEW_RESPACING), a row per class
        for the first `classes` classes (None: an unconditional model, or labels in model_kwargs). model_kwargs and
        beside: fixed inputs per sample and images shown beside them (training.preview.superres_preview_inputs).
        shape: (channels, height, width) of a sample when the model's input has more channels (super-resolution).
        Training is unchanged by it."""
        if not interval:
            return
        shape = shape or (self.model.in_channels, self.model.image_size, self.model.image_size)
        grid = PreviewGrid(model=self.model, diffusion=diffusion, averaged_state=self.first_average_state,
                           shape=shape, out_dir=get_blob_logdir(), seed=self.seed, labels=preview_labels(classes),
                           model_kwargs=dict(model_kwargs or {}), beside=beside, log=logger.log)
        self.loop.periodic.append((int(interval), grid))

    def _save_set(self, step: int) -> Optional[str]:
        """Write the set at `step` (averages, optNNNNNN.pt, modelNNNNNN.pt) into the log dir; returns the model file.
        Weights that went non-finite are never written."""
        weights = list(self.mp_trainer.master_params) + [v for ema in self.emas for v in ema.vars()]
        return self.checkpoints.save(step, self._checkpoint_states, weights)

    def _outcome(self, took: bool, losses: Mapping[str, Any]) -> StepOutcome:
        return StepOutcome(took, losses, self.mp_trainer.lg_loss_scale if self.mp_trainer.use_fp16 else None)


class TrainLoop(_ADMRun):
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
        ema_std="",
        max_steps: int = 0,
    ):
        self.diffusion = diffusion
        self.data = data
        self.batch_size = batch_size
        self.microbatch = microbatch if microbatch > 0 else batch_size
        self.lr = lr
        self.ema_rate = parse_ema_rates(ema_rate)
        self.ema_std = parse_ema_stds(ema_std)
        self.log_interval = log_interval
        self.save_interval = save_interval
        self.use_fp16 = use_fp16
        self.fp16_scale_growth = fp16_scale_growth
        self.schedule_sampler = schedule_sampler or UniformSampler(diffusion)
        self.weight_decay = weight_decay
        self.lr_anneal_steps = lr_anneal_steps
        self.max_steps = max_steps
        self.seed = seed
        self.step = 0
        self.global_batch = self.batch_size * dist_util.get_world_size()
        self._step_losses: Dict[str, List[float]] = {}
        self._set_up(model=model, resume_checkpoint=resume_checkpoint, ema_rates=self.ema_rate,
                     ema_stds=self.ema_std, released_notice=True, log_step=False, use_fp16=use_fp16, lr=lr,
                     weight_decay=weight_decay, fp16_scale_growth=fp16_scale_growth)
        self.resumed_from = self.resume_checkpoint or None
        self.loop = TrainingLoop(
            seed=seed, guard=self.guard, emas=self.emas, params=lambda: self.mp_trainer.master_params,
            sync_vars=lambda: (list(self.mp_trainer.master_params) + list(self.mp_trainer.model_params)
                               + self._optimizer_vars()),
            save=self._save_set, save_interval=save_interval,
            stop_at=stop_step(lr_anneal_steps or None, max_steps),
            log=lambda step, outcome: self._log(step), progress="training",
            # Run for a finite amount of time in integration tests (the reference's hook).
            on_save=[lambda step, path: bool(os.environ.get("DIFFUSION_TRAINING_TEST", ""))])

    @property
    def ema_params(self) -> List[List[jt.Var]]:
        """The multi-rate EMA's averages, one list of master-parameter Vars per rate (the reference's attribute)."""
        return self.emas[0].averages if self.ema_rate else []

    def run_loop(self) -> None:
        """Train until lr_anneal_steps (forever when 0) or max_steps, logging and saving at the set intervals."""
        def step_fn(step: int) -> StepOutcome:
            batch, cond = next(self.data)
            return self._optimize(batch, cond, step)

        done = self.loop.run(self.resume_step, step_fn)
        self.step = done - self.resume_step

    def run_step(self, batch, cond) -> None:
        """One optimizer step on a batch (numpy or Vars), seeded from the global step number."""
        step = self.step + self.resume_step
        self.loop.take_step(step, lambda: self._optimize(batch, cond, step))
        self._log_step(step)

    def _optimize(self, batch, cond, step: int) -> StepOutcome:
        self.forward_backward(batch, cond)
        took = self.mp_trainer.optimize(self.opt)
        if self.lr_anneal_steps:  # the lr of the next step, set after this one (as the reference does)
            set_annealed_lr(self.opt, self.lr, step / self.lr_anneal_steps)
        return self._outcome(took, self._step_losses)

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

    def _log(self, step: int) -> None:
        self._log_step(step)
        if step % self.log_interval == 0:
            logger.dumpkvs()

    def log_step(self) -> None:
        """Log the step number, the samples seen and the unreadable images skipped."""
        self._log_step(self.step + self.resume_step)

    def _log_step(self, step: int) -> None:
        logger.logkv("step", step)
        logger.logkv("samples", (step + 1) * self.global_batch)
        log_bad_images(self.data)

    def save(self) -> Optional[str]:
        """Write the set of the current step (ema_<rate>_N.pt, phema_<std>_N.pt, optN.pt, modelN.pt) into the log
        dir (rank 0); returns the model file's path."""
        return self._save_set(self.step + self.resume_step)


class ClassifierTrainLoop(_ADMRun):
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
        ema_std="",
        max_steps: int = 0,
    ):
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
        self._step_losses: Dict[str, float] = {}
        self._set_up(model=model, resume_checkpoint=resume_checkpoint, ema_rates=(),
                     ema_stds=parse_ema_stds(ema_std), released_notice=False, log_step=True, use_fp16=use_fp16,
                     lr=lr, weight_decay=weight_decay, initial_lg_loss_scale=16.0)
        if self.resume_step and self.val_data is not None and hasattr(self.val_data, "seek"):
            self.val_data.seek(-(-self.resume_step // self.eval_interval))
        self.loop = TrainingLoop(
            seed=seed, guard=self.guard, emas=self.emas, params=lambda: self.mp_trainer.master_params,
            sync_vars=lambda: list(self.mp_trainer.master_params) + self._optimizer_vars(),
            save=self._save_set, save_interval=save_interval, stop_at=stop_step(iterations, max_steps),
            log=lambda step, outcome: logger.dumpkvs() if step % log_interval == 0 else None,
            progress="training classifier")

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
        """Train for `iterations` optimizer steps in total (counting the resumed ones), or max_steps."""
        self.loop.run(self.resume_step, self._step)

    def _step(self, step: int) -> StepOutcome:
        logger.logkv("step", step)
        logger.logkv("samples", (step + 1) * self.batch_size * dist_util.get_world_size())
        log_bad_images(self.data)
        if self.anneal_lr:
            set_annealed_lr(self.opt, self.lr, step / self.iterations)
        self.forward_backward_log(self.data)
        took = self.mp_trainer.optimize(self.opt)
        if self.val_data is not None and step % self.eval_interval == 0:
            with jt.no_grad():
                self.model.eval()
                self.forward_backward_log(self.val_data, prefix="val")
                self.model.train()
        return self._outcome(took, self._step_losses)

    def save(self, step: int) -> Optional[str]:
        """Write optNNNNNN.pt then modelNNNNNN.pt (rank 0; never non-finite weights); returns the model file."""
        return self._save_set(step)


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


def find_resume_checkpoint(log_dir: Optional[str] = None, ema_rates: Sequence[float] = (),
                           ema_stds: Sequence[float] = ()) -> Optional[str]:
    """The newest whole checkpoint set's model file in log_dir, so that rerunning a command continues its run.

    (The reference's hook for automatic resumption; override it for checkpoints kept elsewhere.)
    """
    names = [ema_rate_name(r) for r in ema_rates] + [ema_std_name(s) for s in ema_stds]
    found = CheckpointIO(log_dir, ADMLayout(names), RunGuard()).newest() if log_dir else None
    return found[0] if found else None


def log_bad_images(data) -> None:
    """Log how many unreadable images the data iterator skipped so far (when it skipped any)."""
    bad = getattr(data, "bad_images", 0)
    if bad:
        logger.logkv("bad_images", bad)


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
                    "resume_checkpoint", "use_fp16", "fp16_scale_growth", "weight_decay", "lr_anneal_steps", "seed",
                    "ema_std", "max_steps")
CLASSIFIER_LOOP_FLAGS = ("batch_size", "microbatch", "lr", "weight_decay", "anneal_lr", "iterations", "noised",
                         "resume_checkpoint", "log_interval", "eval_interval", "save_interval", "seed", "ema_std",
                         "max_steps")
#: The defaults of the training-core flags every ADM training script adds to its own (off: the reference's run).
TRAINING_CORE_DEFAULTS = dict(ema_std="", max_steps=0, finetune_from="")
#: The defaults of the flags of the ADM scripts that train a generative model (image_train, free_train,
#: scripts/super_res_train).
PREVIEW_DEFAULTS = dict(preview_interval=0)


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
