"""
Winograd F(2x2, 3x3) convolution for CPU inference.

A 3x3, stride-1, padding-1 convolution computed with Winograd's minimal filtering algorithm needs 16 multiplies per
2x2 output tile instead of 36, so its GEMM work is 2.25x smaller than a direct convolution's. Sampling (and any other
forward pass without gradients) on the CPU spends most of its time in such convolutions. oneDNN's own Winograd
kernel is slower than its direct one on the AVX-512 CPUs we measured, so this module does the transforms itself and
hands the 16 GEMMs per tile chunk to oneDNN's sgemm, all inside one ``jt.code`` kernel:

- weights:  U[k] = G g G^T   (k = 0..15 over the 4x4 transformed tap, [16, O, C])
- inputs:   V[k] = B^T d B   over 4x4 input patches, one column per 2x2 output tile ([16, C, tiles])
- products: M[k] = U[k] @ V[k]  (oneDNN sgemm)
- outputs:  y = A^T m A + bias, written back as NCHW.

The transform matrices hold only 0, +-1 and +-1/2, so the result equals a direct convolution to float32 rounding
(about 1e-6 relative; the parity tests hold it to the reference within their usual tolerances). Tiles are processed
in chunks so the scratch buffers stay small whatever the image size.
"""

import jittor as jt

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

_HEADER = r"""
#include <oneapi/dnnl/dnnl.h>
#include <algorithm>
#include <vector>
#include <omp.h>
"""

_SRC = r"""
    const int N = in0_shape0, C = in0_shape1, H = in0_shape2, W = in0_shape3, O = in1_shape0;
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
            const float* w = g + oc * 9;
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
        float* rr[4];
        for (int i = 0; i < 4; i++) rr[i] = sb + 8 * size_t(TW) + i * size_t(2 * TW + 2);
        const int PW = 2 * TW + 2;
        for (int r0 = my_begin; r0 < my_end; r0 += rows_per_chunk) {
            const int nrows = std::min(rows_per_chunk, my_end - r0);
            const long cnt = long(nrows) * TW;
            // Input transform V[k] = B^T d B: one column per output tile, ld = cnt.
            for (int c = 0; c < C; c++) {
                for (int rl = 0; rl < nrows; rl++) {
                    const int R = r0 + rl, n = R / TH, ty = R % TH;
                    const float* plane = x + (long(n) * C + c) * long(H) * W;
                    const float* src[4];
                    for (int i = 0; i < 4; i++) {
                        const int yy = 2 * ty - 1 + i;
                        src[i] = (yy >= 0 && yy < H) ? plane + long(yy) * W : nullptr;
                    }
                    // Rows of B^T d over the padded width: position p holds input column p - 1.
                    for (int p = 0; p < PW; p++) {
                        const int xx = p - 1;
                        const bool in = xx >= 0 && xx < W;
                        const float d0 = (in && src[0]) ? src[0][xx] : 0.f, d1 = (in && src[1]) ? src[1][xx] : 0.f;
                        const float d2 = (in && src[2]) ? src[2][xx] : 0.f, d3 = (in && src[3]) ? src[3][xx] : 0.f;
                        rr[0][p] = d0 - d2; rr[1][p] = d1 + d2; rr[2][p] = d2 - d1; rr[3][p] = d1 - d3;
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


def winograd_applies(x: jt.Var, weight: jt.Var, stride, padding, dilation, groups: int) -> bool:
    """True when a convolution can take the Winograd path: CPU, float32, 4-D, 3x3, stride 1, padding 1, dense."""
    return (
        not jt.flags.use_cuda
        and jt.mkl_ops is not None
        and x.ndim == 4
        and x.dtype == "float32"
        and weight.dtype == "float32"
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


def winograd_conv3x3(x: jt.Var, weight: jt.Var, bias=None) -> jt.Var:
    """3x3 convolution, stride 1, padding 1, of NCHW float32 `x` with OIHW `weight` (forward only, no gradient)."""
    n, c, h, w = x.shape
    o = weight.shape[0]
    inputs = [x, weight] + ([bias] if bias is not None else [])
    src = _SRC.replace("@BIAS", "in2_p[o]" if bias is not None else "0.f")
    src = src.replace("@TILES_PER_CHUNK", str(int(TILES_PER_CHUNK)))
    return jt.code((n, o, h, w), "float32", inputs, cpu_header=_HEADER, cpu_src=src)
