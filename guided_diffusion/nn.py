"""
Various utilities for neural networks (Jittor port of guided_diffusion/nn.py).

`checkpoint` is real gradient checkpointing (a custom jt.Function that recomputes in backward), as in the reference.

Besides the reference helpers this module holds the attention helpers (`qkv_attention`, `attention_qkv`,
`batched_matmul`) and the layers' device dispatch: on the CPU in float32 the modules here (GroupNorm32, SiLU, the
convolutions, the FiLM `scale_shift`, QKV attention) run the fused kernels of `guided_diffusion.cpu_kernels` and
`guided_diffusion.winograd`; on CUDA, Jittor's own ops.
"""

import math
from typing import Callable, Iterable, Sequence

import numpy as np
import jittor as jt
from jittor import nn

from . import cpu_kernels, winograd


_CHECKPOINT_FORWARD_DEPTH = [0]


def _inference_only() -> bool:
    """True when no gradient will be asked for, so forward-only CPU kernels may run.

    A checkpointed forward also runs with gradients off, but its backward recomputes it with gradients on; the two
    must compute exactly the same thing, so the forward-only kernels stay off inside it.
    """
    return bool(jt.flags.no_grad) and _CHECKPOINT_FORWARD_DEPTH[0] == 0


class SiLU(nn.Module):
    """x * sigmoid(x), as torch.nn.SiLU; on the CPU in float32 one multi-threaded kernel each way."""

    def execute(self, x: jt.Var) -> jt.Var:
        if not jt.flags.use_cuda and x.dtype == "float32":
            return cpu_kernels.silu(x)
        return x * jt.sigmoid(x)


class GroupNorm32(nn.GroupNorm):
    """Group norm computed in float32 with a two-pass variance, cast back to the input dtype.

    Jittor's own GroupNorm uses E[x^2] - E[x]^2, which loses precision for inputs with a large mean; this one
    subtracts the group mean first (as PyTorch does). eps defaults to 1e-5 and the affine parameters stay float32.

    On the CPU (affine, channels divisible by the groups) it runs as fused OpenMP kernels (`cpu_kernels.group_norm`)
    instead of Jittor's single-threaded op-by-op reduce/broadcast kernels: without gradients one forward kernel;
    otherwise one forward kernel (which also keeps the per-group mean and 1/std) and one backward kernel. Inside a
    checkpointed forward (gradients off) the gradient path still runs, so the forward and its recompute are the same
    kernel.
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True):
        super().__init__(num_groups, num_channels, eps=eps, affine=affine)

    def execute(self, x: jt.Var) -> jt.Var:
        in_dtype = x.dtype
        xf = x.float32() if in_dtype != "float32" else x
        shape = xf.shape
        n, c = shape[0], shape[1]
        assert c == self.num_channels, f"GroupNorm32 expects {self.num_channels} channels, got {c}"
        g = self.num_groups
        if not jt.flags.use_cuda and self.affine and c % g == 0 and xf.numel() > 0:
            x3 = xf.reshape((n, c, -1))
            w, b = self.weight.float32(), self.bias.float32()
            xn = cpu_kernels.group_norm(x3, w, b, g, self.eps, with_grad=not _inference_only())
            xn = xn.reshape(shape)
        else:
            xn = _group_norm_ops(xf, self.weight if self.affine else None, self.bias if self.affine else None,
                                 g, self.eps)
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
    """Jittor's Conv2d (same parameters and state-dict keys) with fast CPU paths.

    On the CPU in float32, a 3x3 stride-1 padding-1 convolution with enough tiles and channels runs as Winograd
    F(2x2, 3x3) (`guided_diffusion.winograd`), which does 2.25x fewer multiplies than oneDNN's direct convolution:
    forward only without gradients, otherwise with a Winograd input gradient and weight gradient as well. Other
    convolutions are oneDNN's (through Jittor) with the bias added by one fused kernel; CUDA is Jittor's unchanged.
    """

    def execute(self, x: jt.Var) -> jt.Var:
        if (winograd.winograd_applies(x, self.weight, self.stride, self.padding, self.dilation, self.groups)
                and winograd.winograd_pays(x, self.weight)):
            if _inference_only():
                return winograd.winograd_conv3x3(x, self.weight, self.bias)
            if self.bias is not None and self.bias.dtype == "float32":
                return winograd.winograd_conv3x3_with_grad(x, self.weight, self.bias)
        if _fused_bias_applies(x, self.weight, self.bias):
            return _conv2d_fused_bias(self, x, self.weight)
        return super().execute(x)


class Conv1d(nn.Conv1d):
    """Jittor's Conv1d (same parameters; keys in PyTorch's order) whose bias is added by one fused CPU kernel."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Jittor's Conv1d registers `bias` before `weight`; re-insert it so the parameter order (state_dict,
        # named_parameters) is PyTorch's: weight, then bias.
        bias = self.__dict__.pop("bias")
        self.bias = bias

    def execute(self, x: jt.Var) -> jt.Var:
        if x.ndim == 3 and _fused_bias_applies(x, self.weight, self.bias):
            return _conv2d_fused_bias(self, x.unsqueeze(-1), self.weight.unsqueeze(-1)).squeeze(-1)
        return super().execute(x)


def _conv2d_fused_bias(conv: nn.Module, x: jt.Var, weight: jt.Var) -> jt.Var:
    """`conv` on 4-D x with 4-D weight on the CPU: a 1x1 one in inference as plain GEMMs, otherwise oneDNN's
    convolution (through Jittor) with the bias added by one fused kernel."""
    if _inference_only() and _is_pointwise(conv):
        return cpu_kernels.pointwise_conv(x, weight, conv.bias)
    y = nn.conv2d(x, weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)
    return cpu_kernels.channel_bias_add(y, conv.bias)


def _is_pointwise(conv: nn.Module) -> bool:
    """A 1x1 convolution without stride, padding, dilation or groups (a per-pixel matrix product)."""
    return (all(k == 1 for k in _as_tuple(conv.kernel_size, 2)) and all(s == 1 for s in _as_tuple(conv.stride, 2))
            and all(p == 0 for p in _as_tuple(conv.padding, 2)) and conv.groups == 1)


def _fused_bias_applies(x: jt.Var, weight: jt.Var, bias) -> bool:
    """Whether a convolution's bias may be added by `cpu_kernels.channel_bias_add` (CPU, float32 throughout)."""
    return (bias is not None and not jt.flags.use_cuda
            and x.dtype == "float32" and weight.dtype == "float32" and bias.dtype == "float32")


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
    """Softmax over the last axis, computed in float32 and cast back to x's dtype.

    Exists because Jittor's softmax on the CPU runs three single-threaded sweeps and evaluates exp twice per element
    (about 10x slower than one fused row kernel for attention weights); on CUDA it is Jittor's own.
    """
    if jt.flags.use_cuda or x.ndim == 0:
        return nn.softmax(x.float32(), dim=-1).cast(x.dtype)
    return cpu_kernels.row_softmax(x.float32()).cast(x.dtype)


def _use_onednn(*vs: jt.Var) -> bool:
    return (not jt.flags.use_cuda) and jt.mkl_ops is not None and all(v.dtype == "float32" for v in vs)


def _mm2d(a: jt.Var, b: jt.Var, trans_a: bool, trans_b: bool) -> jt.Var:
    """op(a) @ op(b) for 2-D Vars, through oneDNN's sgemm when available."""
    if _use_onednn(a, b):
        return jt.mkl_ops.mkl_matmul(a, b, trans_a, trans_b)
    if trans_a:
        a = a.transpose((1, 0))
    if trans_b:
        return nn.matmul_transpose(a, b)
    return nn.matmul(a, b)


def _bmm_loop(a: jt.Var, b: jt.Var, trans_a: bool, trans_b: bool) -> jt.Var:
    return jt.stack([_mm2d(a[i], b[i], trans_a, trans_b) for i in range(a.shape[0])], dim=0)


class _BatchedMatmul2D(jt.Function):
    """op(a)[i] @ op(b)[i] for every batch element i, as 2-D oneDNN matmuls in forward and backward."""

    def __init__(self, trans_a: bool, trans_b: bool):
        self.trans_a = trans_a
        self.trans_b = trans_b

    def execute(self, a: jt.Var, b: jt.Var) -> jt.Var:
        self.a = a
        self.b = b
        return _bmm_loop(a, b, self.trans_a, self.trans_b)

    def grad(self, g: jt.Var):
        a, b, ta, tb = self.a, self.b, self.trans_a, self.trans_b
        if g is None:
            return None, None
        if not ta and not tb:  # c = a b
            da = _bmm_loop(g, b, False, True)
            db = _bmm_loop(a, g, True, False)
        elif ta and not tb:  # c = a^T b
            da = _bmm_loop(b, g, False, True)
            db = _bmm_loop(a, g, False, False)
        elif not ta and tb:  # c = a b^T
            da = _bmm_loop(g, b, False, False)
            db = _bmm_loop(g, a, True, False)
        else:  # c = a^T b^T
            da = _bmm_loop(b, g, True, True)
            db = _bmm_loop(g, a, True, True)
        return da, db


def batched_matmul(a: jt.Var, b: jt.Var, trans_a: bool = False, trans_b: bool = False) -> jt.Var:
    """Batched op(a) @ op(b) for 3-D Vars [B, ., .]; op transposes the last two axes when asked.

    Exists because Jittor's batched matmul is slow on the CPU: there it runs per-batch oneDNN 2-D matmuls (with a
    matching backward); on CUDA or without oneDNN it uses Jittor's own matmul.
    """
    assert a.ndim == 3 and b.ndim == 3 and a.shape[0] == b.shape[0], (a.shape, b.shape)
    if _use_onednn(a, b):
        return _BatchedMatmul2D(trans_a, trans_b)(a, b)
    if trans_a:
        a = a.transpose((0, 2, 1))
    if trans_b:
        b = b.transpose((0, 2, 1))
    return nn.matmul(a, b)


def qkv_attention(qkv: jt.Var, n_heads: int, legacy: bool) -> jt.Var:
    """ADM's QKV attention, [N x 3*H*C x T] -> [N x H*C x T]; `legacy` picks QKVAttentionLegacy's channel order.

    The legacy order holds [q | k | v] per head, the new one [q of all heads | k | v]. On the CPU in float32 this is
    one fused kernel per direction (`cpu_kernels.qkv_attention`, reading q, k and v straight from qkv); elsewhere
    `attention_qkv` on the sliced heads.
    """
    bs, width, length = qkv.shape
    assert width % (3 * n_heads) == 0
    ch = width // (3 * n_heads)
    scale = 1 / np.sqrt(np.sqrt(ch))
    if _use_onednn(qkv):
        return cpu_kernels.qkv_attention(qkv, n_heads, legacy, scale, with_grad=not _inference_only())
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
    """h * (1 + scale) + shift, ResBlock's FiLM conditioning; one fused kernel each way on the CPU in float32."""
    if (not jt.flags.use_cuda and all(v.dtype == "float32" for v in (h, scale, shift))
            and tuple(scale.shape) == tuple(shift.shape) == tuple(h.shape[:2]) + (1,) * (h.ndim - 2)):
        return cpu_kernels.scale_shift(h, scale, shift)
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
        _CHECKPOINT_FORWARD_DEPTH[0] += 1
        try:
            with jt.flag_scope(no_grad=1):
                output = self.run_function(*self.input_tensors)
        finally:
            _CHECKPOINT_FORWARD_DEPTH[0] -= 1
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
