"""
Winograd F(2x2, 3x3) convolution on the CPU: forward, input gradient and weight gradient.

A 3x3, stride-1, padding-1 convolution computed with Winograd's minimal filtering algorithm needs 16 multiplies per
2x2 output tile instead of 36, so its GEMM work is 2.25x smaller than a direct convolution's. Sampling and training
on the CPU spend most of their time in such convolutions. oneDNN's own Winograd kernel is slower than its direct one
on the AVX-512 CPUs we measured, so this module does the transforms itself and hands the 16 GEMMs per tile chunk to
oneDNN's sgemm, each direction inside one ``jt.code`` kernel that reads and writes NCHW directly (no layout reorders):

- weights:  U[k] = G g G^T   (k = 0..15 over the 4x4 transformed tap, [16, O, C])
- inputs:   V[k] = B^T d B   over 4x4 input patches, one column per 2x2 output tile ([16, C, tiles])
- products: M[k] = U[k] @ V[k]  (oneDNN sgemm)
- outputs:  y = A^T m A + bias, written back as NCHW.

The input gradient is the same convolution of dy with the weights transposed and flipped. The weight gradient is the
transpose of the forward: dU[k] = sum over tiles of (A dy A^T)[k] V[k]^T, then dw = G^T dU G.

The transform matrices hold only 0, +-1 and +-1/2, so the results equal a direct convolution's to float32 rounding
(about 1e-6 relative; the parity tests hold them to the reference within their usual tolerances). Tiles are
processed in chunks so the scratch buffers stay small whatever the image size.
"""

import jittor as jt

from .kernels import channel_bias_grad

# Output tiles per chunk and thread: large enough for efficient GEMMs, small enough that a chunk's transformed input
# stays near the caches and the scratch memory is bounded (16 * (C + O) * 512 tiles * 4 bytes: 32 MiB for C + O =
# 1024).
TILES_PER_CHUNK = 512
# Below this many 2x2 output tiles (e.g. an 8x8 map at batch 4) the per-call weight transform and the thin GEMMs
# cost more than they save, and oneDNN's direct convolution is faster (measured by bench/bench_winograd.py).
MIN_TILES = 256
# With fewer channels the GEMMs are too thin (K = C) and the transforms dominate. On an idle 2-core machine 64
# channels at 64x64, batch 4, ran 1.6x faster than the direct convolution (bench_winograd.py); with the second core
# busy it ran 0.4x, as every multi-threaded kernel suffers then.
MIN_CHANNELS = 64
# The weight gradient's GEMMs contract over the tiles, so it needs more of them to beat oneDNN's backward-weights.
MIN_TILES_GRAD_WEIGHT = 1024

_HEADER = r"""
#include <oneapi/dnnl/dnnl.h>
#include <algorithm>
#include <vector>
#include <omp.h>

// Input transform V[k][c][t] = (B^T d B)[k] of the 4x4 input patches (padding 1) under `nrows` rows of 2x2 output
// tiles starting at tile row r0 (R = n * TH + ty), one column per tile, ld = cnt. rr: 4 * (2 * TW + 2) floats.
static inline void winograd_input_transform(const float* __restrict__ x, int C, int H, int W, int TH, int TW, int r0,
                                            int nrows, long cnt, float* __restrict__ V, float* __restrict__ rr0) {
    const int PW = 2 * TW + 2;
    float* rr[4];
    for (int i = 0; i < 4; i++) rr[i] = rr0 + i * size_t(PW);
    // The padding: rows above and below the image read a row of zeros, columns -1 and W.. hold zeros.
    static thread_local std::vector<float> zero_row;
    if (zero_row.size() < size_t(W)) zero_row.assign(W, 0.f);
    for (int i = 0; i < 4; i++) {
        rr[i][0] = 0.f;
        for (int p = W + 1; p < PW; p++) rr[i][p] = 0.f;
    }
    for (int c = 0; c < C; c++) {
        for (int rl = 0; rl < nrows; rl++) {
            const int R = r0 + rl, n = R / TH, ty = R % TH;
            const float* plane = x + (long(n) * C + c) * long(H) * W;
            const float* src[4];
            for (int i = 0; i < 4; i++) {
                const int yy = 2 * ty - 1 + i;
                src[i] = (yy >= 0 && yy < H) ? plane + long(yy) * W : zero_row.data();
            }
            // Rows of B^T d over the padded width: position p holds input column p - 1.
            {
                const float* __restrict__ s0 = src[0];
                const float* __restrict__ s1 = src[1];
                const float* __restrict__ s2 = src[2];
                const float* __restrict__ s3 = src[3];
                float* __restrict__ q0 = rr[0] + 1;
                float* __restrict__ q1 = rr[1] + 1;
                float* __restrict__ q2 = rr[2] + 1;
                float* __restrict__ q3 = rr[3] + 1;
                for (int xx = 0; xx < W; xx++) {
                    const float d0 = s0[xx], d1 = s1[xx], d2 = s2[xx], d3 = s3[xx];
                    q0[xx] = d0 - d2; q1[xx] = d1 + d2; q2[xx] = d2 - d1; q3[xx] = d1 - d3;
                }
            }
            const long ks = long(C) * cnt;
            float* vc = V + long(c) * cnt + long(rl) * TW;
            for (int i = 0; i < 4; i++) {
                const float* __restrict__ q = rr[i];
                float* __restrict__ v0 = vc + (i * 4 + 0) * ks;
                float* __restrict__ v1 = vc + (i * 4 + 1) * ks;
                float* __restrict__ v2 = vc + (i * 4 + 2) * ks;
                float* __restrict__ v3 = vc + (i * 4 + 3) * ks;
                for (int tx = 0; tx < TW; tx++) {
                    const float a = q[2 * tx], b = q[2 * tx + 1], cc = q[2 * tx + 2], d = q[2 * tx + 3];
                    v0[tx] = a - cc; v1[tx] = b + cc; v2[tx] = cc - b; v3[tx] = b - d;
                }
            }
        }
    }
}
"""

_SRC = r"""
    // @FLIPPED: convolve with the weights transposed (in <-> out) and flipped in space, i.e. the input gradient of
    // the convolution by in1 [C, O, 3, 3].
    const int N = in0_shape0, C = in0_shape1, H = in0_shape2, W = in0_shape3, O = @FLIPPED ? in1_shape1 : in1_shape0;
    const int TH = (H + 1) / 2, TW = (W + 1) / 2, total_rows = N * TH;
    const long UC = long(O) * C;
    const float* __restrict__ x = in0_p;
    const float* __restrict__ g = in1_p;
    float* __restrict__ y = out0_p;
    // Scratch kept between calls (grown on demand) so that no call pays for fresh pages.
    static std::vector<float> u_buf;
    if (u_buf.size() < size_t(16 * UC)) u_buf.resize(16 * UC);
    float* __restrict__ U = u_buf.data();
    const int rows_per_chunk = std::max(1, @TILES_PER_CHUNK / TW);
    const long CH = long(rows_per_chunk) * TW;

    #pragma omp parallel
    {
        // Weight transform U[k] = G g G^T (shared by all threads).
        #pragma omp for schedule(static)
        for (long oc = 0; oc < UC; oc++) {
            float w[9];
            const float* wsrc = g + (@FLIPPED ? (oc % C) * O + oc / C : oc) * 9;
            for (int i = 0; i < 9; i++) w[i] = @FLIPPED ? wsrc[8 - i] : wsrc[i];
            float t[4][3];
            for (int j = 0; j < 3; j++) {
                const float a = w[j], b = w[3 + j], c = w[6 + j];
                t[0][j] = a; t[1][j] = 0.5f * (a + b + c); t[2][j] = 0.5f * (a - b + c); t[3][j] = c;
            }
            for (int i = 0; i < 4; i++) {
                const float a = t[i][0], b = t[i][1], c = t[i][2];
                U[(i * 4 + 0) * UC + oc] = a;
                U[(i * 4 + 1) * UC + oc] = 0.5f * (a + b + c);
                U[(i * 4 + 2) * UC + oc] = 0.5f * (a - b + c);
                U[(i * 4 + 3) * UC + oc] = c;
            }
        }
        // Each thread then owns a contiguous range of tile rows (R = n * TH + ty) and runs input transform, GEMMs
        // and output transform on it alone: no further barrier, so a descheduled thread does not stall the others.
        const int tid = omp_get_thread_num(), nth = omp_get_num_threads();
        const int my_begin = int(long(total_rows) * tid / nth), my_end = int(long(total_rows) * (tid + 1) / nth);
        static thread_local std::vector<float> scratch;
        const size_t need = 16 * size_t(C + O) * CH + 8 * size_t(TW) + 4 * size_t(2 * TW + 2) + 64;
        if (scratch.size() < need) scratch.resize(need);
        float* V = scratch.data();
        float* M = V + 16 * size_t(C) * CH;
        float* sb = M + 16 * size_t(O) * CH;
        float* rr0 = sb + 8 * size_t(TW);
        for (int r0 = my_begin; r0 < my_end; r0 += rows_per_chunk) {
            const int nrows = std::min(rows_per_chunk, my_end - r0);
            const long cnt = long(nrows) * TW;
            // Input transform V[k] = B^T d B: one column per output tile, ld = cnt.
            winograd_input_transform(x, C, H, W, TH, TW, r0, nrows, cnt, V, rr0);
            // 16 GEMMs on this thread: M[k] (O x cnt) = U[k] (O x C) @ V[k] (C x cnt).
            for (int k = 0; k < 16; k++)
                dnnl_sgemm('N', 'N', O, cnt, C, 1.0f, U + k * UC, C, V + long(k) * C * cnt, cnt, 0.0f,
                           M + long(k) * O * cnt, cnt);
            // Output transform y = A^T m A + bias.
            const long ks = long(O) * cnt;
            for (int o = 0; o < O; o++) {
                const float bo = @BIAS;
                for (int rl = 0; rl < nrows; rl++) {
                    const int R = r0 + rl, n = R / TH, ty = R % TH;
                    const float* mo = M + long(o) * cnt + long(rl) * TW;
                    for (int j = 0; j < 4; j++) {
                        const float* __restrict__ m0 = mo + (0 * 4 + j) * ks;
                        const float* __restrict__ m1 = mo + (1 * 4 + j) * ks;
                        const float* __restrict__ m2 = mo + (2 * 4 + j) * ks;
                        const float* __restrict__ m3 = mo + (3 * 4 + j) * ks;
                        float* __restrict__ s0 = sb + j * size_t(TW);
                        float* __restrict__ s1 = sb + (4 + j) * size_t(TW);
                        for (int tx = 0; tx < TW; tx++) {
                            s0[tx] = m0[tx] + m1[tx] + m2[tx];
                            s1[tx] = m1[tx] - m2[tx] - m3[tx];
                        }
                    }
                    float* plane = y + (long(n) * O + o) * long(H) * W;
                    for (int i = 0; i < 2; i++) {
                        const int yy = 2 * ty + i;
                        if (yy >= H) continue;
                        float* __restrict__ row = plane + long(yy) * W;
                        const float* __restrict__ a = sb + (4 * i + 0) * size_t(TW);
                        const float* __restrict__ b = sb + (4 * i + 1) * size_t(TW);
                        const float* __restrict__ cc = sb + (4 * i + 2) * size_t(TW);
                        const float* __restrict__ d = sb + (4 * i + 3) * size_t(TW);
                        const int full = W / 2;
                        for (int tx = 0; tx < full; tx++) {
                            row[2 * tx] = a[tx] + b[tx] + cc[tx] + bo;
                            row[2 * tx + 1] = b[tx] - cc[tx] - d[tx] + bo;
                        }
                        if (W % 2) row[W - 1] = a[full] + b[full] + cc[full] + bo;
                    }
                }
            }
        }
    }
"""


# Weight gradient, the transpose of the forward: with V = B^T d B (the forward's input transform of x) and
# Z = A dy A^T (dy's 2x2 tile lifted to 4x4), dU[k] = sum over tiles of Z[k] V[k]^T, and dw = G^T dU G. Each thread
# accumulates its own tile rows' dU (16 GEMMs per chunk, contracting over the tiles); after one barrier the threads'
# partial sums are added in thread order and transformed back to 3x3. Even H and W only (every tile is whole).
_GRAD_WEIGHT_SRC = r"""
    const int N = in0_shape0, C = in0_shape1, H = in0_shape2, W = in0_shape3, O = in1_shape1;
    const int TH = H / 2, TW = W / 2, total_rows = N * TH;
    const long OC = long(O) * C;
    const float* __restrict__ x = in0_p;
    const float* __restrict__ dy = in1_p;
    const int rows_per_chunk = std::max(1, @TILES_PER_CHUNK / TW);
    const long CH = long(rows_per_chunk) * TW;
    const int max_threads = omp_get_max_threads();
    static std::vector<float> acc_buf;
    if (acc_buf.size() < size_t(max_threads) * 16 * OC) acc_buf.resize(size_t(max_threads) * 16 * OC);
    int used_threads = 1;
    #pragma omp parallel
    {
        const int tid = omp_get_thread_num(), nth = omp_get_num_threads();
        #pragma omp single
        used_threads = nth;
        const int my_begin = int(long(total_rows) * tid / nth), my_end = int(long(total_rows) * (tid + 1) / nth);
        float* __restrict__ acc = acc_buf.data() + size_t(tid) * 16 * OC;
        static thread_local std::vector<float> scratch;
        const size_t need = 16 * size_t(C + O) * CH + 4 * size_t(2 * TW + 2) + 256 * size_t(TW) + 64;
        if (scratch.size() < need) scratch.resize(need);
        float* V = scratch.data();
        float* Z = V + 16 * size_t(C) * CH;
        float* rr0 = Z + 16 * size_t(O) * CH;
        const size_t zbs = 16 * size_t(TW);
        float* zb = rr0 + 4 * size_t(2 * TW + 2);
        if (my_begin >= my_end) std::fill(acc, acc + 16 * OC, 0.f);
        for (int r0 = my_begin; r0 < my_end; r0 += rows_per_chunk) {
            const int nrows = std::min(rows_per_chunk, my_end - r0);
            const long cnt = long(nrows) * TW;
            winograd_input_transform(x, C, H, W, TH, TW, r0, nrows, cnt, V, rr0);
            // Z[k][t][o] = (A dy A^T)[k] for each 2x2 tile of dy, tile-major so that the GEMM below is plain. Blocks
            // of 16 channels are transformed along contiguous rows into zb, then stored as whole 16-float runs.
            const long ks = long(O) * cnt;
            for (int o0 = 0; o0 < O; o0 += 16) {
                const int ob = std::min(16, O - o0);
                for (int rl = 0; rl < nrows; rl++) {
                    const int R = r0 + rl, n = R / TH, ty = R % TH;
                    for (int oo = 0; oo < ob; oo++) {
                        const float* __restrict__ top = dy + ((long(n) * O + o0 + oo) * H + 2 * ty) * long(W);
                        const float* __restrict__ bot = top + W;
                        float* __restrict__ zo = zb + oo * size_t(TW);
                        for (int tx = 0; tx < TW; tx++) {
                            const float e00 = top[2 * tx], e01 = top[2 * tx + 1];
                            const float e10 = bot[2 * tx], e11 = bot[2 * tx + 1];
                            const float p[4] = {e00, e00 + e10, e00 - e10, -e10};
                            const float q[4] = {e01, e01 + e11, e01 - e11, -e11};
                            for (int i = 0; i < 4; i++) {
                                zo[(i * 4 + 0) * zbs + tx] = p[i];
                                zo[(i * 4 + 1) * zbs + tx] = p[i] + q[i];
                                zo[(i * 4 + 2) * zbs + tx] = p[i] - q[i];
                                zo[(i * 4 + 3) * zbs + tx] = -q[i];
                            }
                        }
                    }
                    for (int k = 0; k < 16; k++) {
                        const float* __restrict__ zk = zb + k * zbs;
                        float* __restrict__ dst = Z + k * ks + long(rl) * TW * O + o0;
                        for (int tx = 0; tx < TW; tx++)
                            for (int oo = 0; oo < ob; oo++) dst[long(tx) * O + oo] = zk[oo * size_t(TW) + tx];
                    }
                }
            }
            // dU[k]^T (C x O) += V[k] (C x cnt) @ Z[k] (cnt x O).
            const float beta = r0 == my_begin ? 0.0f : 1.0f;
            for (int k = 0; k < 16; k++)
                dnnl_sgemm('N', 'N', C, O, cnt, 1.0f, V + long(k) * C * cnt, cnt, Z + k * ks, O, beta,
                           acc + k * OC, O);
        }
        #pragma omp barrier
        #pragma omp for schedule(static)
        for (long oc = 0; oc < OC; oc++) {
            const long co = (oc % C) * O + oc / C;
            float m[4][4];
            for (int k = 0; k < 16; k++) {
                float s = 0.f;
                for (int t = 0; t < used_threads; t++) s += acc_buf[(size_t(t) * 16 + k) * OC + co];
                m[k / 4][k % 4] = s;
            }
            float t[3][4];
            for (int j = 0; j < 4; j++) {
                const float h = 0.5f * (m[1][j] + m[2][j]);
                t[0][j] = m[0][j] + h; t[1][j] = 0.5f * (m[1][j] - m[2][j]); t[2][j] = h + m[3][j];
            }
            float* __restrict__ dw = out0_p + oc * 9;
            for (int a = 0; a < 3; a++) {
                const float h = 0.5f * (t[a][1] + t[a][2]);
                dw[a * 3 + 0] = t[a][0] + h; dw[a * 3 + 1] = 0.5f * (t[a][1] - t[a][2]); dw[a * 3 + 2] = h + t[a][3];
            }
        }
    }
"""


def winograd_applies(x: jt.Var, weight: jt.Var, stride, padding, dilation, groups: int) -> bool:
    """True when a convolution has the Winograd path's geometry: 4-D, 3x3, stride 1, padding 1, dense (the device
    and dtype are dispatch's to check)."""
    return (
        x.ndim == 4
        and tuple(weight.shape[2:]) == (3, 3)
        and groups == 1
        and _pair(stride) == (1, 1)
        and _pair(padding) == (1, 1)
        and _pair(dilation) == (1, 1)
        and x.shape[1] == weight.shape[1]
    )


def _pair(v) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def winograd_pays(x: jt.Var, weight: jt.Var) -> bool:
    """True when the Winograd path is faster than the direct convolution for this shape (enough tiles, channels)."""
    return tile_count(x) >= MIN_TILES and min(weight.shape[0], weight.shape[1]) >= MIN_CHANNELS


def tile_count(x: jt.Var) -> int:
    """Number of 2x2 output tiles of a same-size convolution over NCHW `x` (the GEMMs' column count)."""
    n, _, h, w = x.shape
    return n * ((h + 1) // 2) * ((w + 1) // 2)


def winograd_conv3x3(x: jt.Var, weight: jt.Var, bias=None, transposed: bool = False) -> jt.Var:
    """3x3 convolution, stride 1, padding 1, of NCHW float32 `x` with OIHW `weight` (forward only, no gradient).

    With `transposed`, the weight [C_out_of_forward, C, 3, 3] is used transposed and flipped in space: the input
    gradient of the convolution by `weight`, given its output gradient as `x`.
    """
    n, c, h, w = x.shape
    o = weight.shape[1] if transposed else weight.shape[0]
    inputs = [x, weight] + ([bias] if bias is not None else [])
    src = _SRC.replace("@BIAS", "in2_p[o]" if bias is not None else "0.f")
    src = src.replace("@TILES_PER_CHUNK", str(int(TILES_PER_CHUNK)))
    src = src.replace("@FLIPPED", "true" if transposed else "false")
    return jt.code((n, o, h, w), "float32", inputs, cpu_header=_HEADER, cpu_src=src)


class _WinogradConv3x3(jt.Function):
    """Winograd forward, input gradient and weight gradient; the bias gradient by one fused kernel."""

    def execute(self, x: jt.Var, weight: jt.Var, bias: jt.Var) -> jt.Var:
        self.saved = (x, weight)
        self.needs = (not x.is_stop_grad(), not weight.is_stop_grad(), not bias.is_stop_grad())
        return winograd_conv3x3(x, weight, bias)

    def grad(self, dy: jt.Var):
        if dy is None:
            return None, None, None
        x, weight = self.saved
        need_x, need_weight, need_bias = self.needs
        dy = dy.float32()
        dx = dweight = dbias = None
        if need_x:
            # The input gradient of a 3x3 stride-1 padding-1 convolution is the same convolution of dy with the
            # weights transposed (in <-> out) and flipped in space (read so by the kernel).
            dx = winograd_conv3x3(dy, weight, transposed=True)
        if need_weight:
            if x.shape[2] % 2 == 0 and x.shape[3] % 2 == 0 and tile_count(x) >= MIN_TILES_GRAD_WEIGHT:
                dweight = winograd_grad_weight(x, dy)
            else:
                dweight = jt.mkl_ops.mkl_conv_backward_w(x, dy, 3, 3, 1, 1, 1, 1, 1, 1, 1)
        if need_bias:
            dbias = channel_bias_grad(dy)
        return dx, dweight, dbias


def winograd_conv3x3_with_grad(x: jt.Var, weight: jt.Var, bias: jt.Var) -> jt.Var:
    """winograd_conv3x3 (with a bias) that also gives gradients for x, weight and bias, for training on the CPU."""
    return _WinogradConv3x3()(x, weight, bias)


def winograd_grad_weight(x: jt.Var, dy: jt.Var) -> jt.Var:
    """Weight gradient [O, C, 3, 3] of a 3x3 stride-1 padding-1 convolution of NCHW `x` (even H, W) given dy."""
    src = _GRAD_WEIGHT_SRC.replace("@TILES_PER_CHUNK", str(int(TILES_PER_CHUNK)))
    return jt.code((dy.shape[1], x.shape[1], 3, 3), "float32", [x, dy], cpu_header=_HEADER, cpu_src=src)
