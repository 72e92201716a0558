"""
The CPU fast-path ops that choose among kernels: the model code calls them after `dispatch.fast_cpu_path`.

A convolution takes Winograd F(2x2, 3x3) where it pays (forward only without gradients, with its own input and
weight gradients otherwise), a 1x1 one in inference runs as plain GEMMs, and any other is oneDNN's (through Jittor)
with the bias added by one fused kernel. Group norm and the UNet's QKV attention keep what their backward needs only
when gradients will be asked for. Batched matmuls run as per-batch oneDNN sgemms in both directions.
"""

import jittor as jt
from jittor import nn

from . import kernels, winograd
from .dispatch import inference_only


def group_norm(x: jt.Var, weight: jt.Var, bias: jt.Var, groups: int, eps: float) -> jt.Var:
    """Two-pass group norm with affine parameters of a float32 [N, C, ...] Var as fused kernels."""
    shape = x.shape
    out = kernels.group_norm(x.reshape((shape[0], shape[1], -1)), weight, bias, groups, eps,
                             with_grad=not inference_only())
    return out.reshape(shape)


def conv2d(conv: nn.Conv2d, x: jt.Var) -> jt.Var:
    """conv(x) for a Jittor Conv2d (its stride, padding, dilation, groups, weight and bias) on the CPU."""
    weight, bias = conv.weight, conv.bias
    if (winograd.winograd_applies(x, weight, conv.stride, conv.padding, conv.dilation, conv.groups)
            and winograd.winograd_pays(x, weight)):
        if inference_only():
            return winograd.winograd_conv3x3(x, weight, bias)
        if bias is not None and bias.dtype == "float32":
            return winograd.winograd_conv3x3_with_grad(x, weight, bias)
    if bias is not None and bias.dtype == "float32":
        return _conv_with_fused_bias(conv, x, weight)
    return nn.Conv2d.execute(conv, x)


def conv1d(conv: nn.Conv1d, x: jt.Var) -> jt.Var:
    """conv(x) for a Jittor Conv1d on 3-D x: a 2-D convolution of height 1 with the fused bias."""
    if conv.bias is not None and conv.bias.dtype == "float32":
        return _conv_with_fused_bias(conv, x.unsqueeze(-1), conv.weight.unsqueeze(-1)).squeeze(-1)
    return nn.Conv1d.execute(conv, x)


def _conv_with_fused_bias(conv: nn.Module, x: jt.Var, weight: jt.Var) -> jt.Var:
    """`conv` on 4-D x with 4-D weight: a 1x1 one in inference as plain GEMMs, otherwise oneDNN's convolution
    (through Jittor) with the bias added by one fused kernel."""
    if inference_only() and _is_pointwise(conv):
        return kernels.pointwise_conv(x, weight, conv.bias)
    y = nn.conv2d(x, weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)
    return kernels.channel_bias_add(y, conv.bias)


def _pair(v) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _is_pointwise(conv: nn.Module) -> bool:
    """A 1x1 convolution without stride, padding, dilation or groups (a per-pixel matrix product)."""
    return (all(k == 1 for k in _pair(conv.kernel_size)) and all(s == 1 for s in _pair(conv.stride))
            and all(p == 0 for p in _pair(conv.padding)) and conv.groups == 1)


def qkv_attention(qkv: jt.Var, heads: int, legacy: bool, scale: float) -> jt.Var:
    """ADM's QKV attention straight from the qkv projection, one fused kernel per direction."""
    return kernels.qkv_attention(qkv, heads, legacy, scale, with_grad=not inference_only())


def _mm2d(a: jt.Var, b: jt.Var, trans_a: bool, trans_b: bool) -> jt.Var:
    return jt.mkl_ops.mkl_matmul(a, b, trans_a, trans_b)


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
    """Batched op(a) @ op(b) for 3-D Vars as per-batch oneDNN matmuls, with a matching backward."""
    return _BatchedMatmul2D(trans_a, trans_b)(a, b)


def scaled_dot_product_attention(q: jt.Var, k: jt.Var, v: jt.Var, scale: float) -> jt.Var:
    """softmax(q k^T * scale) v over (batch, tokens, dim) inputs (DiT's heads), by the faster CPU route for the shape.

    Without gradients: one kernel, per head plain oneDNN sgemms around a row softmax with the [N, N] weights in
    cache. With gradients, per-batch oneDNN matmuls (`batched_matmul`) win for long sequences (>= 512 tokens) when the
    batch is small or gradients are needed; for DiT's usual many-heads-few-tokens shapes their per-element overhead
    dominates and Jittor's batched matmul is faster (bench/RESULTS.md).
    """
    b, n, _ = q.shape
    if inference_only():
        return kernels.attention_heads(q * scale, k.transpose((0, 2, 1)), v)
    if n >= 512 and (b <= 8 or not jt.flags.no_grad):
        attn = nn.softmax(batched_matmul(q, k, trans_b=True) * scale, dim=-1)
        return batched_matmul(attn, v)
    attn = nn.softmax(nn.bmm_transpose(q, k) * scale, dim=-1)
    return nn.bmm(attn, v)
