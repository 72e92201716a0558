"""
Fused CPU kernels (OpenMP, oneDNN sgemm) for the UNet's and DiT's training steps and sampling loops.

On the CPU Jittor runs elementwise ops and reductions as single-threaded kernels, one per op, reduces over
non-contiguous axes slowly, and its batched matmul does not use oneDNN; oneDNN's convolutions reorder NCHW tensors to
blocked layouts on every call. Each function here does one layer's piece of work as one multi-threaded kernel per
direction: group norm, SiLU, the conv bias, the FiLM scale-shift, 1x1 convolutions, softmax, attention (the UNet's
QKV attention and DiT's heads), DiT's adaLN, and the trainer's squared norms. All are deterministic (each sum they
take themselves is taken by one thread in a fixed order, so it does not depend on the thread count) and equal the
op-by-op computation up to float32 rounding. Callers reach them through `guided_diffusion.cpu` (dispatch decides: only on
the CPU with float32 inputs; CUDA keeps Jittor's own ops). The Winograd convolutions are in
`guided_diffusion.cpu.winograd`; `guided_diffusion.cpu.ops` chooses between them.
"""

from typing import List, Sequence

import jittor as jt

# Tensors with fewer elements than this run on one thread, where waking the others would cost more than it saves.
OMP_MIN_ELEMENTS = 1 << 15

# One row's softmax: max, then exp (evaluated once per element) and sum in one sweep, then scale. Safe in place
# (y == x); shared by the row-softmax kernel and the attention kernels.
SOFTMAX_ROW_HEADER = r"""
#include <cmath>
static inline void softmax_row(const float* x, float* y, size_t cols) {
    float m = x[0];
    for (size_t c = 1; c < cols; c++) m = x[c] > m ? x[c] : m;
    float s = 0;
    for (size_t c = 0; c < cols; c++) { const float e = std::exp(x[c] - m); y[c] = e; s += e; }
    const float inv = 1.f / s;
    for (size_t c = 0; c < cols; c++) y[c] *= inv;
}
"""


def _src(template: str, **values) -> str:
    out = template.replace("@MIN_PARALLEL", str(OMP_MIN_ELEMENTS))
    for key, value in values.items():
        out = out.replace("@" + key, str(value))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Per-channel bias of a convolution: y[n, c, ...] = x[n, c, ...] + bias[c]
# ---------------------------------------------------------------------------------------------------------------

_BIAS_ADD_SRC = r"""
    const int N = in0_shape0, C = in0_shape1;
    const size_t S = in0->num / (size_t(N) * C);
    #pragma omp parallel for schedule(static) if(in0->num >= @MIN_PARALLEL)
    for (int p = 0; p < N * C; p++) {
        const float b = in1_p[p % C];
        const float* __restrict__ x = in0_p + size_t(p) * S;
        float* __restrict__ y = out0_p + size_t(p) * S;
        for (size_t i = 0; i < S; i++) y[i] = x[i] + b;
    }
"""

# dbias[c] = sum over n and the spatial axes of dy; one task per channel.
_BIAS_GRAD_SRC = r"""
    const int N = in0_shape0, C = in0_shape1;
    const size_t S = in0->num / (size_t(N) * C);
    #pragma omp parallel for schedule(static) if(in0->num >= @MIN_PARALLEL)
    for (int c = 0; c < C; c++) {
        double acc = 0;
        for (int n = 0; n < N; n++) {
            const float* __restrict__ g = in0_p + (size_t(n) * C + c) * S;
            for (size_t i = 0; i < S; i++) acc += g[i];
        }
        out0_p[c] = float(acc);
    }
"""


class _ChannelBiasAdd(jt.Function):
    def execute(self, x: jt.Var, bias: jt.Var) -> jt.Var:
        return jt.code(x.shape, x.dtype, [x, bias], cpu_src=_src(_BIAS_ADD_SRC))

    def grad(self, dy: jt.Var):
        if dy is None:
            return None, None
        return dy, channel_bias_grad(dy)


def channel_bias_grad(dy: jt.Var) -> jt.Var:
    """The gradient of a per-channel bias, dy summed over every axis but 1, as one kernel."""
    return jt.code((dy.shape[1],), "float32", [dy], cpu_src=_src(_BIAS_GRAD_SRC))


def channel_bias_add(x: jt.Var, bias: jt.Var) -> jt.Var:
    """x + bias[c] over float32 [N, C, ...]; its bias gradient is one kernel instead of Jittor's slow axis reduce."""
    return _ChannelBiasAdd()(x, bias)


# ---------------------------------------------------------------------------------------------------------------
# Pointwise (1x1) convolution as one GEMM per sample, straight on NCHW: y[n] = W x[n] + bias
# ---------------------------------------------------------------------------------------------------------------

# x [N, C, S], weight [O, C], bias [O] -> y [N, O, S]. oneDNN's sgemm threads each product itself; oneDNN's
# convolution would instead reorder x and y to and from a channels-last layout on every call.
_POINTWISE_CONV_SRC = r"""
    const int N = in0_shape0, C = in0_shape1, O = in1_shape0;
    const long S = in0_shape2;
    for (int n = 0; n < N; n++) {
        float* __restrict__ y = out0_p + long(n) * O * S;
        #pragma omp parallel for schedule(static) if(long(O) * S >= @MIN_PARALLEL)
        for (int o = 0; o < O; o++) {
            const float b = in2_p[o];
            for (long i = 0; i < S; i++) y[o * S + i] = b;
        }
        dnnl_sgemm('N', 'N', O, S, C, 1.0f, in1_p, C, in0_p + long(n) * C * S, S, 1.0f, y, S);
    }
"""


def pointwise_conv(x: jt.Var, weight: jt.Var, bias: jt.Var) -> jt.Var:
    """1x1 convolution of float32 x [N, C, ...] by weight [O, C, 1, ...] plus bias [O]; forward only."""
    n, c = x.shape[0], x.shape[1]
    o = weight.shape[0]
    y = jt.code((n, o, x.numel() // (n * c)), "float32",
                [x.reshape((n, c, -1)), weight.reshape((o, c)), bias],
                cpu_header="#include <oneapi/dnnl/dnnl.h>", cpu_src=_src(_POINTWISE_CONV_SRC))
    return y.reshape((n, o) + tuple(x.shape[2:]))


# ---------------------------------------------------------------------------------------------------------------
# SiLU: y = x * sigmoid(x)
# ---------------------------------------------------------------------------------------------------------------

_SILU_SRC = r"""
    const size_t n = in0->num;
    #pragma omp parallel for schedule(static) if(n >= @MIN_PARALLEL)
    for (size_t i = 0; i < n; i++) {
        const float x = in0_p[i];
        out0_p[i] = x * (1.0f / (1.0f + std::exp(-x)));
    }
"""

# dx = dy * s * (1 + x * (1 - s)) with s = sigmoid(x).
_SILU_GRAD_SRC = r"""
    const size_t n = in0->num;
    #pragma omp parallel for schedule(static) if(n >= @MIN_PARALLEL)
    for (size_t i = 0; i < n; i++) {
        const float x = in0_p[i], s = 1.0f / (1.0f + std::exp(-x));
        out0_p[i] = in1_p[i] * (s * (1.0f + x * (1.0f - s)));
    }
"""


class _SiLU(jt.Function):
    def execute(self, x: jt.Var) -> jt.Var:
        self.x = x
        return jt.code(x.shape, x.dtype, [x], cpu_header="#include <cmath>", cpu_src=_src(_SILU_SRC))

    def grad(self, dy: jt.Var):
        if dy is None:
            return None
        return jt.code(self.x.shape, "float32", [self.x, dy], cpu_header="#include <cmath>",
                       cpu_src=_src(_SILU_GRAD_SRC))


def silu(x: jt.Var) -> jt.Var:
    """x * sigmoid(x) of a float32 tensor, one multi-threaded kernel each way."""
    return _SiLU()(x)


# ---------------------------------------------------------------------------------------------------------------
# FiLM: y = h * (1 + scale) + shift with per-(n, c) scale and shift (ResBlock's use_scale_shift_norm)
# ---------------------------------------------------------------------------------------------------------------

_SCALE_SHIFT_SRC = r"""
    const int N = in0_shape0, C = in0_shape1;
    const size_t S = in0->num / (size_t(N) * C);
    #pragma omp parallel for schedule(static) if(in0->num >= @MIN_PARALLEL)
    for (int p = 0; p < N * C; p++) {
        const float a = 1.0f + in1_p[p], b = in2_p[p];
        const float* __restrict__ h = in0_p + size_t(p) * S;
        float* __restrict__ y = out0_p + size_t(p) * S;
        for (size_t i = 0; i < S; i++) y[i] = h[i] * a + b;
    }
"""

# Inputs h, scale, dy; outputs dh = dy * (1 + scale), dscale = sum_s dy * h, dshift = sum_s dy (per (n, c)).
_SCALE_SHIFT_GRAD_SRC = r"""
    const int N = in0_shape0, C = in0_shape1;
    const size_t S = in0->num / (size_t(N) * C);
    #pragma omp parallel for schedule(static) if(in0->num >= @MIN_PARALLEL)
    for (int p = 0; p < N * C; p++) {
        const float a = 1.0f + in1_p[p];
        const float* __restrict__ h = in0_p + size_t(p) * S;
        const float* __restrict__ g = in2_p + size_t(p) * S;
        float* __restrict__ dh = out0_p + size_t(p) * S;
        double gh = 0, gs = 0;
        for (size_t i = 0; i < S; i++) {
            dh[i] = g[i] * a;
            gh += double(g[i]) * h[i];
            gs += g[i];
        }
        out1_p[p] = float(gh);
        out2_p[p] = float(gs);
    }
"""


class _ScaleShift(jt.Function):
    def execute(self, h: jt.Var, scale: jt.Var, shift: jt.Var) -> jt.Var:
        self.saved = (h, scale)
        return jt.code(h.shape, h.dtype, [h, scale, shift], cpu_src=_src(_SCALE_SHIFT_SRC))

    def grad(self, dy: jt.Var):
        if dy is None:
            return None, None, None
        h, scale = self.saved
        dh, dscale, dshift = jt.code([h.shape, scale.shape, scale.shape], ["float32"] * 3, [h, scale, dy],
                                     cpu_src=_src(_SCALE_SHIFT_GRAD_SRC))
        return dh, dscale, dshift


def scale_shift(h: jt.Var, scale: jt.Var, shift: jt.Var) -> jt.Var:
    """h * (1 + scale) + shift for float32 h [N, C, ...] and scale, shift [N, C, 1, ...], one kernel each way."""
    return _ScaleShift()(h, scale, shift)


# ---------------------------------------------------------------------------------------------------------------
# DiT's adaLN: y = LayerNorm(x) * (1 + scale) + shift, no affine parameters, per-sample shift and scale
# ---------------------------------------------------------------------------------------------------------------

# x [B, T, D], shift and scale [B, D]. Two-pass mean and variance with double accumulators, one task per row.
_LAYER_NORM_MODULATE_SRC = r"""
    const int B = in0_shape0, T = in0_shape1, D = in0_shape2;
    #pragma omp parallel for schedule(static) if(in0->num >= @MIN_PARALLEL)
    for (long r = 0; r < long(B) * T; r++) {
        const float* __restrict__ x = in0_p + r * D;
        const float* __restrict__ shift = in1_p + (r / T) * D;
        const float* __restrict__ scale = in2_p + (r / T) * D;
        float* __restrict__ y = out0_p + r * D;
        double sum = 0;
        for (int d = 0; d < D; d++) sum += x[d];
        const float mean = float(sum / D);
        double sq = 0;
        for (int d = 0; d < D; d++) { const float c = x[d] - mean; sq += double(c) * c; }
        const float inv = float(1.0 / std::sqrt(sq / D + @EPS));
        for (int d = 0; d < D; d++) y[d] = (x[d] - mean) * inv * (1.0f + scale[d]) + shift[d];
    }
"""


def layer_norm_modulate(x: jt.Var, shift: jt.Var, scale: jt.Var, eps: float) -> jt.Var:
    """LayerNorm (no affine) of float32 x [B, T, D], then * (1 + scale) + shift ([B, D]); forward only."""
    return jt.code(x.shape, "float32", [x, shift, scale], cpu_header="#include <cmath>",
                   cpu_src=_src(_LAYER_NORM_MODULATE_SRC, EPS=repr(float(eps))))


# ---------------------------------------------------------------------------------------------------------------
# Group norm (GroupNorm32) with affine parameters
# ---------------------------------------------------------------------------------------------------------------

# Forward: y = (x - mean) * rstd * weight + bias per (n, group), two-pass variance with double accumulators. One
# OpenMP task per (n, g); each group is reduced sequentially by one thread, so results do not depend on the thread
# count. @SAVE_STATS writes the group's float mean and 1/std (outputs 1 and 2, [N, G]) for the backward kernel.
_GROUP_NORM_SRC = r"""
    const int N = in0_shape0, C = in0_shape1, S = in0_shape2, G = @GROUPS, CG = C / G;
    const double len = double(CG) * S;
    #pragma omp parallel for schedule(static) if(size_t(N) * C * S >= @MIN_PARALLEL)
    for (int ng = 0; ng < N * G; ng++) {
        const int n = ng / G, g = ng % G;
        const size_t base = (size_t(n) * C + size_t(g) * CG) * S;
        const in0_type* __restrict__ xi = in0_p + base;
        out0_type* __restrict__ yo = out0_p + base;
        const size_t cnt = size_t(CG) * S;
        double sum = 0;
        for (size_t i = 0; i < cnt; i++) sum += xi[i];
        const float mean = float(sum / len);
        double sq = 0;
        for (size_t i = 0; i < cnt; i++) { float d = xi[i] - mean; sq += double(d) * d; }
        const float inv = float(1.0 / std::sqrt(sq / len + @EPS));
        @SAVE_STATS
        for (int c = 0; c < CG; c++) {
            const float a = in1_p[g * CG + c] * inv, b = in2_p[g * CG + c];
            const in0_type* __restrict__ xc = xi + size_t(c) * S;
            out0_type* __restrict__ yc = yo + size_t(c) * S;
            for (int i = 0; i < S; i++) yc[i] = (xc[i] - mean) * a + b;
        }
    }
"""

# Backward. Inputs: x, weight, dy [N, C, S], mean, rstd [N, G]; outputs dx, dweight [C], dbias [C]. With
# xhat = (x - mean) * rstd (recomputed exactly as in the forward) and dyhat = dy * weight:
#   dx = rstd * (dyhat - mean_group(dyhat) - xhat * mean_group(dyhat * xhat)),
#   dweight[c] = sum_{n,s} dy * xhat,  dbias[c] = sum_{n,s} dy.
# The first loop (one task per (n, g)) writes the per-(n, c) sums to a buffer; the second sums them over n in a fixed
# order, one task per channel: no races, and results independent of the thread count.
_GROUP_NORM_GRAD_SRC = r"""
    const int N = in0_shape0, C = in0_shape1, S = in0_shape2, G = @GROUPS, CG = C / G;
    const double len = double(CG) * S;
    std::vector<double> part(size_t(2) * N * C);
    double* __restrict__ sum_dy = part.data();
    double* __restrict__ sum_dy_xhat = sum_dy + size_t(N) * C;
    #pragma omp parallel for schedule(static) if(size_t(N) * C * S >= @MIN_PARALLEL)
    for (int ng = 0; ng < N * G; ng++) {
        const int n = ng / G, g = ng % G;
        const size_t base = (size_t(n) * C + size_t(g) * CG) * S;
        const in0_type* __restrict__ xi = in0_p + base;
        const in2_type* __restrict__ gi = in2_p + base;
        out0_type* __restrict__ dxo = out0_p + base;
        const float mean = in3_p[ng], rstd = in4_p[ng];
        double m1 = 0, m2 = 0;
        for (int c = 0; c < CG; c++) {
            const in0_type* __restrict__ xc = xi + size_t(c) * S;
            const in2_type* __restrict__ gc = gi + size_t(c) * S;
            double a = 0, b = 0;
            for (int i = 0; i < S; i++) {
                const float xh = (xc[i] - mean) * rstd;
                a += gc[i];
                b += double(gc[i]) * xh;
            }
            const size_t nc = size_t(n) * C + size_t(g) * CG + c;
            sum_dy[nc] = a;
            sum_dy_xhat[nc] = b;
            const double w = in1_p[g * CG + c];
            m1 += w * a;
            m2 += w * b;
        }
        const float mean_dyhat = float(m1 / len), mean_dyhat_xhat = float(m2 / len);
        for (int c = 0; c < CG; c++) {
            const in0_type* __restrict__ xc = xi + size_t(c) * S;
            const in2_type* __restrict__ gc = gi + size_t(c) * S;
            out0_type* __restrict__ dc = dxo + size_t(c) * S;
            const float w = in1_p[g * CG + c];
            for (int i = 0; i < S; i++) {
                const float xh = (xc[i] - mean) * rstd;
                dc[i] = rstd * (gc[i] * w - mean_dyhat - xh * mean_dyhat_xhat);
            }
        }
    }
    #pragma omp parallel for schedule(static) if(size_t(N) * C >= @MIN_PARALLEL)
    for (int c = 0; c < C; c++) {
        double a = 0, b = 0;
        for (int n = 0; n < N; n++) { a += sum_dy[size_t(n) * C + c]; b += sum_dy_xhat[size_t(n) * C + c]; }
        out1_p[c] = float(b);
        out2_p[c] = float(a);
    }
"""


def _group_norm_src(template: str, groups: int, eps: float, save_stats: bool = False) -> str:
    stats = "out1_p[ng] = mean; out2_p[ng] = inv;" if save_stats else ""
    return _src(template, GROUPS=int(groups), EPS=repr(float(eps)), SAVE_STATS=stats)


class _GroupNorm(jt.Function):
    """Group norm with affine on float32 [N, C, S] Vars: one CPU kernel forward, one backward (x, weight, bias)."""

    def __init__(self, groups: int, eps: float):
        self.groups = int(groups)
        self.eps = float(eps)

    def execute(self, x: jt.Var, weight: jt.Var, bias: jt.Var) -> jt.Var:
        n, g = x.shape[0], self.groups
        src = _group_norm_src(_GROUP_NORM_SRC, g, self.eps, save_stats=True)
        y, mean, rstd = jt.code([x.shape, (n, g), (n, g)], [x.dtype, "float32", "float32"], [x, weight, bias],
                                cpu_src=src)
        self.saved = (x, weight, mean, rstd)
        return y

    def grad(self, dy):
        if dy is None:
            return None, None, None
        x, weight, mean, rstd = self.saved
        src = _group_norm_src(_GROUP_NORM_GRAD_SRC, self.groups, self.eps)
        dx, dweight, dbias = jt.code([x.shape, weight.shape, weight.shape], [x.dtype, "float32", "float32"],
                                     [x, weight, dy.float32(), mean, rstd], cpu_src=src,
                                     cpu_header="#include <vector>")
        return dx, dweight, dbias


def group_norm(x: jt.Var, weight: jt.Var, bias: jt.Var, groups: int, eps: float, with_grad: bool) -> jt.Var:
    """Two-pass group norm with affine of float32 x [N, C, S]; without `with_grad` one forward-only kernel."""
    if with_grad:
        return _GroupNorm(groups, eps)(x, weight, bias)
    return jt.code(x.shape, x.dtype, [x, weight, bias], cpu_src=_group_norm_src(_GROUP_NORM_SRC, groups, eps))


# ---------------------------------------------------------------------------------------------------------------
# Softmax over the last axis
# ---------------------------------------------------------------------------------------------------------------

_ROW_SOFTMAX_SRC = r"""
    const size_t rows = in0_shape0, cols = in0_shape1;
    #pragma omp parallel for schedule(static) if(rows * cols >= @MIN_PARALLEL)
    for (size_t r = 0; r < rows; r++) softmax_row(in0_p + r * cols, out0_p + r * cols, cols);
"""


class _RowSoftmax(jt.Function):
    """Softmax over the last axis as one CPU kernel (max, exp and sum in one sweep, exp computed once)."""

    def execute(self, x: jt.Var) -> jt.Var:
        x2 = x.reshape((-1, x.shape[-1]))
        y = jt.code(x2.shape, x2.dtype, [x2], cpu_header=SOFTMAX_ROW_HEADER,
                    cpu_src=_src(_ROW_SOFTMAX_SRC)).reshape(x.shape)
        self.y = y
        return y

    def grad(self, g: jt.Var) -> jt.Var:
        y = self.y
        return y * (g - (g * y).sum(dim=-1, keepdims=True))


def row_softmax(x: jt.Var) -> jt.Var:
    """Softmax of float32 x over its last axis, one kernel forward (the backward is two Jittor ops)."""
    return _RowSoftmax()(x)


# ---------------------------------------------------------------------------------------------------------------
# Token-major attention heads (DiT inference)
# ---------------------------------------------------------------------------------------------------------------

_ATTENTION_HEADS_HEADER = SOFTMAX_ROW_HEADER + r"""
#include <oneapi/dnnl/dnnl.h>
#include <vector>
"""

# One OpenMP task per attention head: [T, S] weights = q @ k (oneDNN sgemm, run by the task's thread), the row
# softmax, then weights @ v. The weights live in a per-thread buffer kept between calls.
_ATTENTION_HEADS_SRC = r"""
    const int B = in0_shape0, T = in0_shape1, D = in0_shape2, S = in1_shape2;
    #pragma omp parallel
    {
        static thread_local std::vector<float> wbuf;
        if (wbuf.size() < size_t(T) * S) wbuf.resize(size_t(T) * S);
        float* __restrict__ w = wbuf.data();
        #pragma omp for schedule(static)
        for (int b = 0; b < B; b++) {
            dnnl_sgemm('N', 'N', T, S, D, 1.0f, in0_p + size_t(b) * T * D, D, in1_p + size_t(b) * D * S, S, 0.0f,
                       w, S);
            for (int t = 0; t < T; t++) softmax_row(w + size_t(t) * S, w + size_t(t) * S, S);
            dnnl_sgemm('N', 'N', T, D, S, 1.0f, w, S, in2_p + size_t(b) * S * D, D, 0.0f,
                       out0_p + size_t(b) * T * D, D);
        }
    }
"""


def attention_heads(q: jt.Var, k: jt.Var, v: jt.Var) -> jt.Var:
    """softmax(q @ k) @ v per head for float32 q [B, T, D], k [B, D, S], v [B, S, D] on the CPU, without gradients.

    Exists so that inference attention is one kernel (one OpenMP region over heads) instead of two matmuls and a
    softmax per head: on 2 cores, hundreds of tiny parallel regions per forward stall whenever a core is busy.
    """
    return jt.code((q.shape[0], q.shape[1], q.shape[2]), "float32", [q.float32(), k.float32(), v.float32()],
                   cpu_header=_ATTENTION_HEADS_HEADER, cpu_src=_ATTENTION_HEADS_SRC).cast(q.dtype)


# ---------------------------------------------------------------------------------------------------------------
# QKV attention of the UNet, straight from the qkv projection [N, 3 * H * ch, T]
# ---------------------------------------------------------------------------------------------------------------

# Where head b = n * H + h finds its q, k and v ([ch, T] each, row stride T) inside qkv [N, 3 * H * ch, T]: the
# legacy order keeps [q | k | v] per head, the new order [q of all heads | k | v].
_QKV_HEADER = SOFTMAX_ROW_HEADER + r"""
#include <oneapi/dnnl/dnnl.h>
#include <vector>
static inline void head_offsets(int b, int H, size_t D, size_t T, bool legacy, size_t* q, size_t* k, size_t* v) {
    const size_t n = b / H, h = b % H;
    if (legacy) {
        *q = (size_t(b) * 3) * D * T;
        *k = *q + D * T;
        *v = *k + D * T;
    } else {
        *q = (n * 3 * H + h) * D * T;
        *k = *q + size_t(H) * D * T;
        *v = *k + size_t(H) * D * T;
    }
}
static inline void transpose_into(const float* __restrict__ a, float* __restrict__ at, size_t rows, size_t cols) {
    for (size_t r = 0; r < rows; r++)
        for (size_t c = 0; c < cols; c++) at[c * rows + r] = a[r * cols + c];
}
static inline float* grow(std::vector<float>& buf, size_t n) {
    if (buf.size() < n) buf.resize(n);
    return buf.data();
}
"""

# One OpenMP task per head b = n * H + h; each thread's scratch holds three [T, ch] blocks and one [T, T] block.
_QKV_SKELETON = r"""
    const int N = in0_shape0, H = @HEADS;
    const size_t T = in0_shape2, D = in0_shape1 / (3 * H);
    const bool legacy = @LEGACY;
    #pragma omp parallel
    {
        static thread_local std::vector<float> scratch;
        float* __restrict__ s = grow(scratch, 3 * T * D + T * T);
        #pragma omp for schedule(static)
        for (int b = 0; b < N * H; b++) {
            size_t oq, ok, ov;
            head_offsets(b, H, D, T, legacy, &oq, &ok, &ov);
@PER_HEAD
        }
    }
"""

# Forward: W = softmax(ALPHA * q^T k) [T, T] (at @WEIGHTS: output 1, or the scratch), out = v W^T written as [ch, T] into the
# head's channels of out [N, H * ch, T]. Only plain (non-transposed) sgemms, on transposed copies in the scratch.
_QKV_FORWARD_HEAD = r"""
            float* __restrict__ qt = s;
            float* __restrict__ vt = s + T * D;
            float* __restrict__ ot = s + 2 * T * D;
            float* __restrict__ w = @WEIGHTS;
            transpose_into(in0_p + oq, qt, D, T);
            dnnl_sgemm('N', 'N', T, T, D, @ALPHA, qt, D, in0_p + ok, T, 0.0f, w, T);
            for (size_t t = 0; t < T; t++) softmax_row(w + t * T, w + t * T, T);
            transpose_into(in0_p + ov, vt, D, T);
            dnnl_sgemm('N', 'N', T, D, T, 1.0f, w, T, vt, D, 0.0f, ot, D);
            transpose_into(ot, out0_p + size_t(b) * D * T, T, D);
"""

# Backward. Inputs qkv, W [N * H, T, T], dout [N, H * ch, T]; output dqkv (same layout as qkv). Per head, with G =
# dout's [ch, T] block and P = softmax input:
#   dv = G W,  dW = G^T v,  dP = W * (dW - rowsum(dW * W)),  dk = ALPHA q dP,  dq = ALPHA k dP^T.
_QKV_BACKWARD_HEAD = r"""
            float* __restrict__ gt = s;
            float* __restrict__ kt = s + T * D;
            float* __restrict__ dqt = s + 2 * T * D;
            float* __restrict__ dp = s + 3 * T * D;
            const float* __restrict__ w = in1_p + size_t(b) * T * T;
            const float* __restrict__ g = in2_p + size_t(b) * D * T;
            dnnl_sgemm('N', 'N', D, T, T, 1.0f, g, T, w, T, 0.0f, out0_p + ov, T);
            transpose_into(g, gt, D, T);
            dnnl_sgemm('N', 'N', T, T, D, 1.0f, gt, D, in0_p + ov, T, 0.0f, dp, T);
            for (size_t t = 0; t < T; t++) {
                float* __restrict__ row = dp + t * T;
                const float* __restrict__ wr = w + t * T;
                float dot = 0;
                for (size_t c = 0; c < T; c++) dot += row[c] * wr[c];
                for (size_t c = 0; c < T; c++) row[c] = wr[c] * (row[c] - dot);
            }
            dnnl_sgemm('N', 'N', D, T, T, @ALPHA, in0_p + oq, T, dp, T, 0.0f, out0_p + ok, T);
            transpose_into(in0_p + ok, kt, D, T);
            dnnl_sgemm('N', 'N', T, D, T, @ALPHA, dp, T, kt, D, 0.0f, dqt, D);
            transpose_into(dqt, out0_p + oq, T, D);
"""
_QKV_FORWARD_SRC = _QKV_SKELETON.replace("@PER_HEAD", _QKV_FORWARD_HEAD.strip("\n"))
_QKV_BACKWARD_SRC = _QKV_SKELETON.replace("@PER_HEAD", _QKV_BACKWARD_HEAD.strip("\n"))


def _qkv_src(template: str, heads: int, legacy: bool, scale: float, save_weights: bool = False) -> str:
    alpha = float(scale) * float(scale)
    return _src(template, HEADS=int(heads), LEGACY="true" if legacy else "false", ALPHA=f"float({alpha!r})",
                WEIGHTS="out1_p + size_t(b) * T * T" if save_weights else "s + 3 * T * D")


def _qkv_out_shape(qkv: jt.Var) -> tuple:
    n, width, length = qkv.shape
    return (n, width // 3, length)


class _QKVAttention(jt.Function):
    def __init__(self, heads: int, legacy: bool, scale: float):
        self.heads, self.legacy, self.scale = int(heads), bool(legacy), float(scale)

    def execute(self, qkv: jt.Var) -> jt.Var:
        n, _, length = qkv.shape
        src = _qkv_src(_QKV_FORWARD_SRC, self.heads, self.legacy, self.scale, save_weights=True)
        out, weights = jt.code([_qkv_out_shape(qkv), (n * self.heads, length, length)],
                               ["float32", "float32"], [qkv], cpu_header=_QKV_HEADER, cpu_src=src)
        self.saved = (qkv, weights)
        return out

    def grad(self, dout: jt.Var):
        if dout is None:
            return None
        qkv, weights = self.saved
        src = _qkv_src(_QKV_BACKWARD_SRC, self.heads, self.legacy, self.scale)
        return jt.code(qkv.shape, "float32", [qkv, weights, dout.float32()], cpu_header=_QKV_HEADER, cpu_src=src)


def qkv_attention(qkv: jt.Var, heads: int, legacy: bool, scale: float, with_grad: bool) -> jt.Var:
    """ADM attention of float32 qkv [N, 3 * H * ch, T] -> [N, H * ch, T], one kernel per direction.

    softmax((q * scale)^T (k * scale)) applied to v for each head, with the q/k/v channel order of
    QKVAttentionLegacy (`legacy`) or QKVAttention. Without `with_grad` the [T, T] weights stay in a per-thread buffer.
    """
    if with_grad:
        return _QKVAttention(heads, legacy, scale)(qkv)
    src = _qkv_src(_QKV_FORWARD_SRC, heads, legacy, scale)
    return jt.code(_qkv_out_shape(qkv), "float32", [qkv], cpu_header=_QKV_HEADER, cpu_src=src)


# ---------------------------------------------------------------------------------------------------------------
# Sums of squares of many tensors (the trainer's parameter and gradient norms)
# ---------------------------------------------------------------------------------------------------------------

_SUM_SQUARES_SRC = r"""
    const float* ptrs[] = {@POINTERS};
    const size_t nums[] = {@NUMS};
    const int count = @COUNT;
    #pragma omp parallel for schedule(dynamic, 1)
    for (int i = 0; i < count; i++) {
        const float* __restrict__ x = ptrs[i];
        double acc = 0;
        for (size_t j = 0; j < nums[i]; j++) acc += double(x[j]) * x[j];
        out0_p[i] = acc;
    }
"""

# Inputs per kernel: bounds the generated source; a model's tensors are reduced in a few calls.
_SUM_SQUARES_CHUNK = 64


def sum_of_squares(tensors: Sequence[jt.Var]) -> jt.Var:
    """float64 [len(tensors)] of each float32 tensor's sum of squares, a few kernels for a whole model."""
    if not tensors:
        return jt.zeros((0,), "float64")
    parts: List[jt.Var] = []
    for start in range(0, len(tensors), _SUM_SQUARES_CHUNK):
        chunk = list(tensors[start : start + _SUM_SQUARES_CHUNK])
        src = _src(_SUM_SQUARES_SRC, COUNT=len(chunk),
                   POINTERS=", ".join(f"in{i}_p" for i in range(len(chunk))),
                   NUMS=", ".join(f"size_t(in{i}->num)" for i in range(len(chunk))))
        parts.append(jt.code((len(chunk),), "float64", chunk, cpu_src=src))
    return parts[0] if len(parts) == 1 else jt.concat(parts)
