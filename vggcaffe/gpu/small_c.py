"""Direct CUDA kernels for convolutions with few input channels (VGG's conv1_1: 3).

cuDNN's engines are slow on such layers (see vggcaffe.gpu.conv, which times
both and keeps the faster): `conv_small_c` computes y = relu?(conv(x, w) + b)
into a channels-last top, one thread per output pixel and 8 output channels;
`conv_small_c_wgrad` the weight gradient as partial sums over chunks of output
pixels, reduced by `sum_rows` in a fixed order so it is the same run to run.
"""
import functools

import cupy
import numpy as np

from . import kernels

SMALL_C = 4                 # at most this many input channels
_FORWARD_SOURCE = kernels._CONVERT + kernels._VEC8 + r"""
typedef IDX_T idx_t;
// y = relu?(conv(x, w) + b) for few input channels: one thread per output pixel and 8
// output channels, the weights (as float) and biases in shared memory, float
// accumulation. x (N, H, W, Cp) and w (K, kh, kw, Cp): the compute-type copies cuDNN gets
// (channels C..Cp-1 are zero padding, skipped); y channels-last (N, OH, OW, K), K % 8 == 0.
extern "C" __global__ void conv_small_c(
        const T_X* x, const T_X* wt, const float* bias, T_Y* y, long long total,
        int C, int Cp, int H, int W, int K, int OH, int OW, int kh, int kw, int sh, int sw, int ph, int pw,
        int has_bias, int relu) {
    extern __shared__ float ws[];                 // K * kh * kw * C weights, then K biases
    const int taps = kh * kw * C, nw = K * taps;
    for (int i = threadIdx.x; i < nw; i += blockDim.x)
        ws[i] = load_f(wt, (long long)(i / C) * Cp + i % C);
    for (int i = threadIdx.x; i < K; i += blockDim.x)
        ws[nw + i] = has_bias ? bias[i] : 0.0f;
    __syncthreads();
    const int K8 = K / 8;
    for (long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x; t < total;
         t += (long long)gridDim.x * blockDim.x) {
        idx_t r = (idx_t)t;
        int g = r % K8; r /= K8;
        int ow = r % OW; r /= OW;
        int oh = r % OH;
        int n = (int)(r / OH);
        float acc[8];
        #pragma unroll
        for (int k = 0; k < 8; ++k) acc[k] = ws[nw + g * 8 + k];
        for (int a = 0; a < kh; ++a) {
            int ih = oh * sh - ph + a;
            if (ih < 0 || ih >= H) continue;
            for (int b = 0; b < kw; ++b) {
                int iw = ow * sw - pw + b;
                if (iw < 0 || iw >= W) continue;
                long long base = (((long long)n * H + ih) * W + iw) * Cp;
                const float* wk = ws + (long long)g * 8 * taps + (a * kw + b) * C;
                for (int c = 0; c < C; ++c) {
                    float v = load_f(x, base + c);
                    #pragma unroll
                    for (int k = 0; k < 8; ++k) acc[k] += v * wk[k * taps + c];
                }
            }
        }
        if (relu) {
            #pragma unroll
            for (int k = 0; k < 8; ++k) acc[k] = acc[k] < 0.0f ? 0.0f : acc[k];
        }
        store8(y + (((long long)n * OH + oh) * OW + ow) * K + g * 8, acc);
    }
}
"""


_WGRAD_SOURCE = kernels._CONVERT + kernels._VEC8 + r"""
typedef IDX_T idx_t;
// Partial weight gradients for few input channels (C = SC, kw = SKW, compile-time, so the
// accumulators stay in registers): thread (chunk, tile), tile = (g, a) the 8-output group and
// the kernel row; over the chunk's output pixels p, acc[k][b * SC + c] += dz[p][8g + k] *
// x[tap (a, b) of p][c]. partial[chunk] holds dW (K, kh, kw, C) of its pixels. x (N, H, W, Cp)
// and dz (N, OH, OW, K) are the compute-type NHWC arrays cuDNN's wgrad gets.
extern "C" __global__ void conv_small_c_wgrad(
        const T_X* x, const T_X* dz, float* partial, long long total, long long pixels, int chunk,
        int Cp, int H, int W, int K, int OH, int OW, int kh, int sh, int sw, int ph, int pw) {
    const int tiles = (K / 8) * kh, taps = SKW * SC;
    for (long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x; t < total;
         t += (long long)gridDim.x * blockDim.x) {
        int tile = (int)(t % tiles), g = tile / kh, a = tile % kh;
        long long part = t / tiles, p1 = min((part + 1) * chunk, pixels);
        float acc[8][SKW * SC], d[8];
        #pragma unroll
        for (int k = 0; k < 8; ++k)
            #pragma unroll
            for (int j = 0; j < SKW * SC; ++j) acc[k][j] = 0.0f;
        for (long long p = part * chunk; p < p1; ++p) {
            idx_t r = (idx_t)p;
            int ow = r % OW; r /= OW;
            int oh = r % OH;
            int n = (int)(r / OH);
            int ih = oh * sh - ph + a;
            if (ih < 0 || ih >= H) continue;
            load8(dz + p * K + g * 8, d);
            #pragma unroll
            for (int b = 0; b < SKW; ++b) {
                int iw = ow * sw - pw + b;
                if (iw >= 0 && iw < W) {
                    long long base = (((long long)n * H + ih) * W + iw) * Cp;
                    #pragma unroll
                    for (int c = 0; c < SC; ++c) {
                        float v = load_f(x, base + c);
                        #pragma unroll
                        for (int k = 0; k < 8; ++k) acc[k][b * SC + c] += d[k] * v;
                    }
                }
            }
        }
        float* out = partial + part * (long long)K * kh * taps;
        #pragma unroll
        for (int k = 0; k < 8; ++k)
            #pragma unroll
            for (int j = 0; j < SKW * SC; ++j) out[((long long)(g * 8 + k) * kh + a) * taps + j] = acc[k][j];
    }
}

// out[s][o] = the sum over rows s, s + slices, s + 2 slices, ... of in[row][o] (o < cols): the
// partial sums reduced in a fixed order, so the gradient is the same run to run.
extern "C" __global__ void sum_rows(const float* in, float* out, long long rows, int cols, int slices) {
    for (long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x; t < (long long)slices * cols;
         t += (long long)gridDim.x * blockDim.x) {
        int o = (int)(t % cols), s = (int)(t / cols);
        float acc = 0.0f;
        for (long long r = s; r < rows; r += slices) acc += in[r * cols + o];
        out[(long long)s * cols + o] = acc;
    }
}
"""
WGRAD_CHUNK, WGRAD_SLICES = 512, 64     # output pixels per partial sum; first-stage slices of the reduction


@functools.lru_cache(maxsize=None)
def wgrad_kernels(x_dtype, c, kw, wide):
    """(partial-sum kernel, row-sum kernel) of the small-C weight gradient for C = c, kw."""
    code = (_WGRAD_SOURCE.replace("T_X", kernels._C_TYPES[np.dtype(x_dtype)]).replace("SKW", str(kw))
            .replace("SC", str(c)).replace("IDX_T", "long long" if wide else "unsigned int"))
    return cupy.RawKernel(code, "conv_small_c_wgrad"), cupy.RawKernel(code, "sum_rows")


@functools.lru_cache(maxsize=None)
def forward_kernel(x_dtype, y_dtype, wide):
    code = (_FORWARD_SOURCE.replace("T_X", kernels._C_TYPES[np.dtype(x_dtype)])
            .replace("T_Y", kernels._C_TYPES[np.dtype(y_dtype)]).replace("IDX_T", "long long" if wide else "unsigned int"))
    return cupy.RawKernel(code, "conv_small_c")
