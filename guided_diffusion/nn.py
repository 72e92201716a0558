"""
Various utilities for neural networks (Jittor port of guided_diffusion/nn.py).

`checkpoint` is real gradient checkpointing (a custom jt.Function that recomputes in backward), as in the reference.

Besides the reference helpers this module holds the attention helpers (`qkv_attention`, `attention_qkv`,
`batched_matmul`). Where `guided_diffusion.cpu` says so (on the CPU in float32) the layers here run its fused
kernels; otherwise, and on CUDA, the Jittor ops written out below.
"""

import math
from typing import Callable, Iterable, Sequence

import numpy as np
import jittor as jt
from jittor import nn

from . import cpu


class SiLU(nn.Module):
    """x * sigmoid(x), as torch.nn.SiLU."""

    def execute(self, x: jt.Var) -> jt.Var:
        if cpu.fast_cpu_path(x):
            return cpu.silu(x)
        return x * jt.sigmoid(x)


class GroupNorm32(nn.GroupNorm):
    """Group norm computed in float32 with a two-pass variance, cast back to the input dtype.

    Jittor's own GroupNorm uses E[x^2] - E[x]^2, which loses precision for inputs with a large mean; this one
    subtracts the group mean first (as PyTorch does). eps defaults to 1e-5 and the affine parameters stay float32.
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True):
        super().__init__(num_groups, num_channels, eps=eps, affine=affine)

    def execute(self, x: jt.Var) -> jt.Var:
        in_dtype = x.dtype
        xf = x.float32() if in_dtype != "float32" else x
        c = xf.shape[1]
        assert c == self.num_channels, f"GroupNorm32 expects {self.num_channels} channels, got {c}"
        if self.affine and c % self.num_groups == 0 and cpu.fast_cpu_path(xf, self.weight, self.bias):
            xn = cpu.group_norm(xf, self.weight, self.bias, self.num_groups, self.eps)
        else:
            xn = _group_norm_ops(xf, self.weight if self.affine else None, self.bias if self.affine else None,
                                 self.num_groups, self.eps)
        if in_dtype != "float32":
            xn = xn.cast(in_dtype)
        return xn


def _group_norm_ops(x: jt.Var, weight, bias, groups: int, eps: float) -> jt.Var:
    """Two-pass group norm of a float32 [N, C, ...] Var from Jittor ops (any device; differentiable by Jittor)."""
    shape = x.shape
    n, c = shape[0], shape[1]
    xg = x.reshape((n, groups, -1))
    mean = xg.mean(dim=2, keepdims=True)
    xc = xg - mean
    var = (xc * xc).mean(dim=2, keepdims=True)
    xn = (xc / jt.sqrt(var + eps)).reshape(shape)
    if weight is not None:
        bshape = [1, c] + [1] * (len(shape) - 2)
        xn = xn * weight.reshape(bshape) + bias.reshape(bshape)
    return xn


def _as_tuple(v, n: int) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


class AvgPoolNd(nn.Module):
    """Average pooling over the last `dims` axes (like torch's AvgPool1d/2d/3d, floor mode).

    Non-overlapping windows without padding (the only kind the models use) are computed exactly by a reshape and a
    mean; Jittor's own pool refuses inputs no larger than the window (2x2 -> 1x1) and has no 1-D version. Other
    settings are passed to Jittor's pool (2-D and 3-D only).
    """

    def __init__(self, dims: int, kernel_size, stride=None, padding=0):
        super().__init__()
        self.dims = dims
        self.kernel_size = _as_tuple(kernel_size, dims)
        self.stride = _as_tuple(stride if stride is not None else kernel_size, dims)
        self.padding = _as_tuple(padding, dims)
        self._simple = self.kernel_size == self.stride and not any(self.padding)
        if not self._simple:
            if dims == 2:
                self._pool = nn.AvgPool2d(self.kernel_size, self.stride, self.padding)
            elif dims == 3:
                self._pool = nn.AvgPool3d(self.kernel_size, self.stride, self.padding)
            else:
                raise NotImplementedError("1-D average pooling supports only kernel_size == stride, no padding")

    def execute(self, x: jt.Var) -> jt.Var:
        if not self._simple:
            return self._pool(x)
        lead = list(x.shape[: x.ndim - self.dims])
        spatial = list(x.shape[x.ndim - self.dims :])
        out = [s // k for s, k in zip(spatial, self.kernel_size)]
        if any(o * k != s for o, k, s in zip(out, self.kernel_size, spatial)):
            idx = [slice(None)] * len(lead) + [slice(0, o * k) for o, k in zip(out, self.kernel_size)]
            x = x[tuple(idx)]
        split = []
        for o, k in zip(out, self.kernel_size):
            split += [o, k]
        y = x.reshape(tuple(lead + split))
        red = [len(lead) + 2 * i + 1 for i in range(self.dims)]
        return y.mean(dims=red)


class Conv2d(nn.Conv2d):
    """Jittor's Conv2d (same parameters and state-dict keys); on the CPU path `guided_diffusion.cpu.conv2d` (Winograd
    F(2x2, 3x3) where it pays, the bias fused)."""

    def execute(self, x: jt.Var) -> jt.Var:
        if cpu.fast_cpu_path(x, self.weight):
            return cpu.conv2d(self, x)
        return super().execute(x)


class Conv1d(nn.Conv1d):
    """Jittor's Conv1d (same parameters; keys in PyTorch's order); on the CPU path the bias is fused."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Jittor's Conv1d registers `bias` before `weight`; re-insert it so the parameter order (state_dict,
        # named_parameters) is PyTorch's: weight, then bias.
        bias = self.__dict__.pop("bias")
        self.bias = bias

    def execute(self, x: jt.Var) -> jt.Var:
        if x.ndim == 3 and cpu.fast_cpu_path(x, self.weight):
            return cpu.conv1d(self, x)
        return super().execute(x)


def conv_nd(dims: int, *args, **kwargs) -> nn.Module:
    """Create a 1D, 2D, or 3D convolution module (Jittor's inits: U(+-1/sqrt(fan_in)) as PyTorch's)."""
    if dims == 1:
        return Conv1d(*args, **kwargs)
    elif dims == 2:
        return Conv2d(*args, **kwargs)
    elif dims == 3:
        return nn.Conv3d(*args, **kwargs)
    raise ValueError(f"unsupported dimensions: {dims}")


def linear(*args, **kwargs) -> nn.Module:
    """Create a linear module (Jittor's init matches PyTorch's distribution)."""
    return nn.Linear(*args, **kwargs)


def avg_pool_nd(dims: int, *args, **kwargs) -> nn.Module:
    """Create a 1D, 2D, or 3D average pooling module."""
    if dims in (1, 2, 3):
        return AvgPoolNd(dims, *args, **kwargs)
    raise ValueError(f"unsupported dimensions: {dims}")


def update_ema(target_params: Iterable[jt.Var], source_params: Iterable[jt.Var], rate: float = 0.99) -> None:
    """Update target parameters to be closer to those of source parameters using an exponential moving average.

    :param target_params: the target parameter sequence.
    :param source_params: the source parameter sequence.
    :param rate: the EMA rate (closer to 1 means slower).
    """
    updated = []
    for targ, src in zip(target_params, source_params):
        targ.assign((targ * rate + src.detach() * (1 - rate)).cast(targ.dtype))
        updated.append(targ)
    # Evaluate now: Jittor is lazy, and an EMA that is never read would otherwise grow its graph every step.
    if updated:
        jt.sync(updated)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero out the parameters of a module and return it."""
    for p in module.parameters():
        p.assign(jt.zeros(p.shape, p.dtype))
    return module


def scale_module(module: nn.Module, scale: float) -> nn.Module:
    """Scale the parameters of a module and return it."""
    for p in module.parameters():
        p.assign((p * scale).cast(p.dtype))
    return module


def mean_flat(tensor: jt.Var) -> jt.Var:
    """Take the mean over all non-batch dimensions."""
    if tensor.ndim <= 1:
        return tensor
    return tensor.mean(dims=list(range(1, tensor.ndim)))


def normalization(channels: int) -> nn.Module:
    """Make a standard normalization layer: GroupNorm32 with 32 groups."""
    return GroupNorm32(32, channels)


def _timestep_freqs(half: int, max_period: float) -> np.ndarray:
    # Same float32 operation order as the reference: exp((-ln(P) * arange(half)) / half).
    scaled = np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32)
    return np.exp(scaled / np.float32(half)).astype(np.float32)


def timestep_embedding(timesteps: jt.Var, dim: int, max_period: float = 10000) -> jt.Var:
    """Create sinusoidal timestep embeddings, [cos | sin] (plus one zero column when dim is odd).

    :param timesteps: a 1-D Var of N indices, one per batch element (may be fractional). Keep it a Var so that
                      loops over timesteps reuse the compiled kernels.
    :param dim: the dimension of the output.
    :param max_period: controls the minimum frequency of the embeddings.
    :return: an [N x dim] Var of positional embeddings.
    """
    if not isinstance(timesteps, jt.Var):
        timesteps = jt.array(np.asarray(timesteps))
    half = dim // 2
    freqs = jt.array(_timestep_freqs(half, max_period))
    args = timesteps.float32().reshape((-1, 1)) * freqs.reshape((1, -1))
    embedding = jt.concat([jt.cos(args), jt.sin(args)], dim=-1)
    if dim % 2:
        embedding = jt.concat([embedding, jt.zeros((embedding.shape[0], 1), "float32")], dim=-1)
    return embedding


# ---------------------------------------------------------------------------------------------------------------
# Attention matmul helpers
# ---------------------------------------------------------------------------------------------------------------


def softmax_last(x: jt.Var) -> jt.Var:
    """Softmax over the last axis, computed in float32 and cast back to x's dtype."""
    xf = x.float32()
    if x.ndim and cpu.fast_cpu_path(xf):
        return cpu.row_softmax(xf).cast(x.dtype)
    return nn.softmax(xf, dim=-1).cast(x.dtype)


def batched_matmul(a: jt.Var, b: jt.Var, trans_a: bool = False, trans_b: bool = False) -> jt.Var:
    """Batched op(a) @ op(b) for 3-D Vars [B, ., .]; op transposes the last two axes when asked."""
    assert a.ndim == 3 and b.ndim == 3 and a.shape[0] == b.shape[0], (a.shape, b.shape)
    if cpu.fast_cpu_path(a, b):
        return cpu.batched_matmul(a, b, trans_a, trans_b)
    if trans_a:
        a = a.transpose((0, 2, 1))
    if trans_b:
        b = b.transpose((0, 2, 1))
    return nn.matmul(a, b)


def qkv_attention(qkv: jt.Var, n_heads: int, legacy: bool) -> jt.Var:
    """ADM's QKV attention, [N x 3*H*C x T] -> [N x H*C x T]; `legacy` picks QKVAttentionLegacy's channel order.

    The legacy order holds [q | k | v] per head, the new one [q of all heads | k | v].
    """
    bs, width, length = qkv.shape
    assert width % (3 * n_heads) == 0
    ch = width // (3 * n_heads)
    scale = 1 / np.sqrt(np.sqrt(ch))
    if cpu.fast_cpu_path(qkv):
        return cpu.qkv_attention(qkv, n_heads, legacy, scale)
    if legacy:
        qkv = qkv.reshape((bs * n_heads, ch * 3, length))
        q, k, v = qkv[:, :ch], qkv[:, ch : 2 * ch], qkv[:, 2 * ch :]
    else:
        hc = n_heads * ch
        shape = (bs * n_heads, ch, length)
        q, k, v = (part.reshape(shape) for part in (qkv[:, :hc], qkv[:, hc : 2 * hc], qkv[:, 2 * hc :]))
    return attention_qkv(q, k, v, scale).reshape((bs, -1, length))


def attention_qkv(q: jt.Var, k: jt.Var, v: jt.Var, scale: float) -> jt.Var:
    """ADM attention core on [B, ch, T] inputs: softmax_s(sum_c (q*scale)(k*scale)) applied to v -> [B, ch, T].

    q and k are each multiplied by ``scale`` (ch^-1/4 in the reference) before the product; the softmax is
    computed in float32 and cast back to the input dtype. The op-by-op path of `qkv_attention` (CUDA, or dtypes
    other than float32 on the CPU), and its reference in the tests.
    """
    qs = (q * scale).cast(q.dtype)
    ks = (k * scale).cast(k.dtype)
    weight = batched_matmul(qs, ks, trans_a=True, trans_b=False)  # [B, T, S]
    weight = softmax_last(weight)
    return batched_matmul(v, weight, trans_a=False, trans_b=True)  # [B, ch, T]


# ---------------------------------------------------------------------------------------------------------------
# Gradient checkpointing
# ---------------------------------------------------------------------------------------------------------------


def scale_shift(h: jt.Var, scale: jt.Var, shift: jt.Var) -> jt.Var:
    """h * (1 + scale) + shift, ResBlock's FiLM conditioning (scale and shift broadcast over the spatial axes)."""
    if (cpu.fast_cpu_path(h, scale, shift)
            and tuple(scale.shape) == tuple(shift.shape) == tuple(h.shape[:2]) + (1,) * (h.ndim - 2)):
        return cpu.scale_shift(h, scale, shift)
    return h * (1 + scale) + shift


def checkpoint(func: Callable, inputs: Sequence[jt.Var], params: Iterable[jt.Var], flag: bool):
    """Evaluate a function without caching intermediate activations, recomputing them in the backward pass.

    This reduces memory at the expense of extra compute in the backward pass. Values and gradients are the same
    with either flag (as in the reference, the recompute does not restore the random state, so a dropout inside
    `func` draws a fresh mask when recomputed).

    :param func: the function to evaluate.
    :param inputs: the argument sequence to pass to `func`.
    :param params: a sequence of parameters `func` depends on but does not explicitly take as arguments.
    :param flag: if False, disable gradient checkpointing.
    """
    if flag and not jt.flags.no_grad:
        inputs = tuple(inputs)
        params = list(params)
        fn = CheckpointFunction(func, len(inputs), params)
        return fn(*(inputs + tuple(params)))
    return func(*inputs)


class CheckpointFunction(jt.Function):
    """Runs `run_function` without recording a graph; its backward re-runs it and differentiates the recompute."""

    def __init__(self, run_function: Callable, length: int, params: Sequence[jt.Var]):
        self.run_function = run_function
        self.length = length
        # The Vars `run_function` really reads (Function.__call__ hands execute() taped copies instead).
        self.params = list(params)

    def execute(self, *args):
        self.input_tensors = list(args[: self.length])
        with cpu.recomputation(), jt.flag_scope(no_grad=1):
            output = self.run_function(*self.input_tensors)
        self.multiple_outputs = isinstance(output, (tuple, list))
        return output

    def grad(self, *output_grads):
        n_in = self.length
        if all(g is None for g in output_grads):
            return (None,) * (n_in + len(self.params))
        inputs = []
        for x in self.input_tensors:
            if isinstance(x, jt.Var):
                wants_grad = x.dtype.is_float() and not x.is_stop_grad()
                x = x.detach()
                if wants_grad:
                    x.start_grad()
            inputs.append(x)
        with jt.flag_scope(no_grad=0):
            outputs = self.run_function(*inputs)
        if not self.multiple_outputs:
            outputs = [outputs]
        loss = None
        for o, g in zip(outputs, output_grads):
            if g is None or not isinstance(o, jt.Var):
                continue
            term = (o * g.detach().cast(o.dtype)).sum()
            loss = term if loss is None else loss + term
        targets = [(i, v) for i, v in enumerate(inputs + self.params)
                   if isinstance(v, jt.Var) and v.dtype.is_float() and not v.is_stop_grad()]
        grads = [None] * (n_in + len(self.params))
        if loss is not None and targets:
            computed = jt.grad(loss, [v for _, v in targets], retain_graph=False)
            for (i, _), g in zip(targets, computed):
                grads[i] = g
        return tuple(grads)
