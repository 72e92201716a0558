"""
Helpers to train with 16-bit precision.
"""

import jittor as jt
from jittor import nn

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def convert_module_to_f16(l: jt.Module) -> None:
    """Cast a convolution's weight and bias to float16 in place (as the reference; other layers stay float32)."""
    if isinstance(l, _CONV_TYPES):
        l.weight.assign(l.weight.float16())
        if getattr(l, "bias", None) is not None:
            l.bias.assign(l.bias.float16())


def convert_module_to_f32(l: jt.Module) -> None:
    """Cast a convolution's weight and bias back to float32 in place (undoes convert_module_to_f16)."""
    if isinstance(l, _CONV_TYPES):
        l.weight.assign(l.weight.float32())
        if getattr(l, "bias", None) is not None:
            l.bias.assign(l.bias.float32())


# ------------------------------------------------------------------------------------------------------------
# Mixed-precision training (master parameters, dynamic loss scaling), as the reference's fp16_util.
#
# Jittor has no `.grad` attribute: gradients are returned by jt.grad, so MixedPrecisionTrainer keeps them itself
# (summed over microbatches, averaged over MPI ranks) and hands them to the optimizer in optimize().
# ------------------------------------------------------------------------------------------------------------

import collections  # noqa: E402
import math  # noqa: E402
from typing import Dict, List, Optional, Sequence, Tuple  # noqa: E402

import numpy as np  # noqa: E402

from . import cpu, logger  # noqa: E402
from .state_dicts import module_state_dict  # noqa: E402
from .errors import CheckpointError  # noqa: E402

INITIAL_LOG_LOSS_SCALE = 20.0

NamedParams = List[Tuple[str, jt.Var]]
ParamGroups = List[Tuple[NamedParams, tuple]]


def _trainable_named_parameters(model: jt.Module) -> NamedParams:
    return [(n, p) for n, p in model.named_parameters() if not p.is_stop_grad()]


def get_param_groups_and_shapes(named_model_params) -> ParamGroups:
    """Split parameters into vectors/scalars (flattened to shape (-1,)) and matrices (flattened to (1, -1))."""
    named_model_params = list(named_model_params)
    scalar_vector_named_params = ([(n, p) for (n, p) in named_model_params if p.ndim <= 1], (-1,))
    matrix_named_params = ([(n, p) for (n, p) in named_model_params if p.ndim > 1], (1, -1))
    return [scalar_vector_named_params, matrix_named_params]


def _flat_numpy(values: Sequence[np.ndarray], shape: tuple) -> np.ndarray:
    if not values:
        return np.zeros((0,) if len(shape) == 1 else (1, 0), np.float32)
    return np.concatenate([np.asarray(v, np.float32).reshape(-1) for v in values]).reshape(shape)


def make_master_params(param_groups_and_shapes: ParamGroups) -> List[jt.Var]:
    """One float32 master Var per group: the concatenation of the group's (possibly fp16) parameters."""
    master_params = []
    for param_group, shape in param_groups_and_shapes:
        master_params.append(jt.array(_flat_numpy([p.numpy() for (_, p) in param_group], shape)))
    return master_params


def model_grads_to_master_grads(param_groups_and_shapes: ParamGroups, grads: Dict[str, jt.Var]) -> List[jt.Var]:
    """The float32 master gradients: per group, the flattened model gradients (zeros where one is missing)."""
    master_grads = []
    for param_group, shape in param_groups_and_shapes:
        parts = []
        for name, p in param_group:
            g = grads.get(name)
            parts.append((g if g is not None else jt.zeros(p.shape, "float32")).float32().reshape(-1))
        flat = jt.concat(parts) if parts else jt.zeros((0,), "float32")
        master_grads.append(flat.reshape(shape))
    return master_grads


def unflatten_master_params(param_group: NamedParams, master_param: jt.Var) -> List[jt.Var]:
    """Split a flat master Var back into Vars shaped like the group's parameters."""
    out, offset = [], 0
    flat = master_param.reshape(-1)
    for _, p in param_group:
        n = int(np.prod(p.shape)) if len(p.shape) else 1
        out.append(flat[offset: offset + n].reshape(p.shape))
        offset += n
    return out


def master_params_to_model_params(param_groups_and_shapes: ParamGroups, master_params: Sequence[jt.Var]) -> None:
    """Copy the (float32) master values into the model parameters, casting to their dtype (fp16 for convs)."""
    for master_param, (param_group, _) in zip(master_params, param_groups_and_shapes):
        for (_, param), unflat in zip(param_group, unflatten_master_params(param_group, master_param)):
            param.update(unflat.cast(param.dtype))


def _unflatten_numpy(param_group: NamedParams, flat: np.ndarray) -> List[np.ndarray]:
    out, offset = [], 0
    flat = flat.reshape(-1)
    for _, p in param_group:
        n = int(np.prod(p.shape)) if len(p.shape) else 1
        out.append(flat[offset: offset + n].reshape(p.shape))
        offset += n
    return out


def master_params_to_state_dict(model: jt.Module, param_groups_and_shapes: Optional[ParamGroups],
                                master_params: Sequence[jt.Var], use_fp16: bool) -> "collections.OrderedDict":
    """The model's state dict (numpy, float32 parameters) with the parameter values taken from master_params.

    Only numpy work happens here, so it is safe inside a rank-0-only block under MPI.
    """
    state_dict = module_state_dict(model)
    if use_fp16:
        for master_param, (param_group, _) in zip(master_params, param_groups_and_shapes):
            for (name, _), value in zip(param_group, _unflatten_numpy(param_group, master_param.numpy())):
                state_dict[name] = np.array(value, np.float32)
    else:
        for i, (name, _value) in enumerate(_trainable_named_parameters(model)):
            state_dict[name] = np.array(master_params[i].numpy(), np.float32)
    for name, value in state_dict.items():
        if value.dtype == np.float16:
            state_dict[name] = value.astype(np.float32)
    return state_dict


def _check_state_dict_fits(model: jt.Module, state_dict, source: str) -> None:
    params = collections.OrderedDict(_trainable_named_parameters(model))
    missing = [k for k in params if k not in state_dict]
    wrong = [k for k in params if k in state_dict and tuple(np.shape(state_dict[k])) != tuple(params[k].shape)]
    if missing or wrong:
        raise CheckpointError(
            "%s does not fit the model built from the flags (missing: %s; wrong shapes: %s): pass the flags the "
            "checkpoint was trained with" % (source, ", ".join(missing[:8]) or "none", ", ".join(wrong[:8]) or "none")
        )


def state_dict_to_master_params(model: jt.Module, state_dict, use_fp16: bool,
                                source: str = "checkpoint") -> List[jt.Var]:
    """Master Vars (float32) built from a state dict, in the model's parameter order (flattened for fp16)."""
    _check_state_dict_fits(model, state_dict, source)
    named = _trainable_named_parameters(model)
    if use_fp16:
        master = []
        for param_group, shape in get_param_groups_and_shapes(named):
            master.append(jt.array(_flat_numpy([state_dict[n] for n, _ in param_group], shape)))
        return master
    return [jt.array(np.asarray(state_dict[name], np.float32)) for name, _ in named]


def sums_of_squares(tensors: Sequence[jt.Var]) -> np.ndarray:
    """float64 numpy array of each tensor's sum of squares (the trainer's norms; a non-finite one flags NaN/inf)."""
    if not tensors:
        return np.zeros((0,), np.float64)
    if cpu.fast_cpu_path(*tensors):
        return cpu.sum_of_squares(tensors).numpy()
    return jt.concat([t.float32().sqr().sum().reshape(1) for t in tensors]).numpy().astype(np.float64)


def check_overflow(value: float) -> bool:
    """True when value is +-inf or NaN (a sign the fp16 loss scale is too large)."""
    return (value == float("inf")) or (value == -float("inf")) or (value != value)


def apply_gradients(opt, params: Sequence[jt.Var], grads: Sequence[jt.Var]) -> None:
    """Take one optimizer step with explicit gradients (aligned with params)."""
    if hasattr(opt, "step_with_grads"):
        opt.step_with_grads(params, grads)
        return
    by_id = {id(p): g for p, g in zip(params, grads)}
    for pg in opt.param_groups:
        pg["grads"] = [by_id[id(p)] if id(p) in by_id else jt.zeros_like(p) for p in pg["params"]]
    opt.n_step += 1
    opt.step()


class MixedPrecisionTrainer:
    """Holds gradients, (fp16) master parameters and the dynamic loss scale; optimize() takes a step or skips it."""

    def __init__(self, *, model: jt.Module, use_fp16: bool = False, fp16_scale_growth: float = 1e-3,
                 initial_lg_loss_scale: float = INITIAL_LOG_LOSS_SCALE):
        self.model = model
        # float16 only runs on CUDA in this port; on the CPU the model stays float32 (the model prints a notice).
        self.use_fp16 = bool(use_fp16) and bool(jt.flags.use_cuda)
        self.fp16_scale_growth = fp16_scale_growth

        self.named_params = _trainable_named_parameters(model)
        self.param_names = [n for n, _ in self.named_params]
        self.model_params = [p for _, p in self.named_params]
        self.master_params = self.model_params
        self.param_groups_and_shapes = None
        self.lg_loss_scale = initial_lg_loss_scale
        self._grads: Optional[List[jt.Var]] = None

        if self.use_fp16:
            self.param_groups_and_shapes = get_param_groups_and_shapes(self.named_params)
            self.master_params = make_master_params(self.param_groups_and_shapes)
            self.model.convert_to_fp16()

    def zero_grad(self) -> None:
        """Forget the accumulated gradients."""
        self._grads = None

    def backward(self, loss: jt.Var) -> None:
        """Add d(loss)/d(params) to the accumulated gradients (loss scaled by 2**lg_loss_scale in fp16)."""
        if self.use_fp16:
            loss = loss * (2 ** self.lg_loss_scale)
        grads = jt.grad(loss, self.model_params)
        if isinstance(grads, jt.Var):
            grads = [grads]
        grads = [g.stop_grad() for g in grads]
        if self._grads is not None:
            grads = [a + b for a, b in zip(self._grads, grads)]
        jt.sync(grads)
        self._grads = grads

    def _reduced_grads(self) -> List[jt.Var]:
        grads = self._grads
        if grads is None:
            grads = [jt.zeros(p.shape, p.dtype) for p in self.model_params]
        if jt.in_mpi:  # the mean over ranks, as DDP's all-reduce
            grads = [g.mpi_all_reduce("mean") for g in grads]
        return grads

    def optimize(self, opt) -> bool:
        """Step the optimizer with the accumulated gradients; False when an fp16 overflow made it skip."""
        if self.use_fp16:
            return self._optimize_fp16(opt)
        else:
            return self._optimize_normal(opt)

    def _optimize_fp16(self, opt) -> bool:
        logger.logkv_mean("lg_loss_scale", self.lg_loss_scale)
        grads = dict(zip(self.param_names, self._reduced_grads()))
        master_grads = model_grads_to_master_grads(self.param_groups_and_shapes, grads)
        grad_norm, param_norm = self._compute_norms(master_grads, grad_scale=2 ** self.lg_loss_scale)
        if check_overflow(grad_norm):
            self.lg_loss_scale -= 1
            logger.log(f"Found NaN, decreased lg_loss_scale to {self.lg_loss_scale}")
            self.zero_grad()
            return False

        logger.logkv_mean("grad_norm", grad_norm)
        logger.logkv_mean("param_norm", param_norm)

        scale = 1.0 / (2 ** self.lg_loss_scale)
        master_grads = [g * scale for g in master_grads]
        apply_gradients(opt, self.master_params, master_grads)
        self.zero_grad()
        master_params_to_model_params(self.param_groups_and_shapes, self.master_params)
        self.lg_loss_scale += self.fp16_scale_growth
        return True

    def _optimize_normal(self, opt) -> bool:
        grads = self._reduced_grads()
        grad_norm, param_norm = self._compute_norms(grads)
        logger.logkv_mean("grad_norm", grad_norm)
        logger.logkv_mean("param_norm", param_norm)
        if check_overflow(grad_norm):  # non-finite float32 gradients: no update (the caller stops the run)
            self.zero_grad()
            return False
        apply_gradients(opt, self.master_params, grads)
        self.zero_grad()
        return True

    def _compute_norms(self, grads: Sequence[jt.Var], grad_scale: float = 1.0) -> Tuple[float, float]:
        values = sums_of_squares(list(self.master_params) + list(grads))
        n = len(self.master_params)
        param_norm = math.sqrt(float(values[:n].sum()))
        grad_norm = math.sqrt(float(values[n:].sum())) / grad_scale
        return grad_norm, param_norm

    def master_params_to_state_dict(self, master_params: Sequence[jt.Var]) -> "collections.OrderedDict":
        """A float32 numpy state dict of the model with the given master-parameter values (e.g. an EMA)."""
        return master_params_to_state_dict(self.model, self.param_groups_and_shapes, master_params, self.use_fp16)

    def state_dict_to_master_params(self, state_dict, source: str = "checkpoint") -> List[jt.Var]:
        """Master-parameter Vars from a state dict (checked against the model)."""
        return state_dict_to_master_params(self.model, state_dict, self.use_fp16, source=source)
