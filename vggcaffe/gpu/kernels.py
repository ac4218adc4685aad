"""CUDA kernels for the GPU backend (CuPy RawKernel/ElementwiseKernel).

- layout: NCHW <-> NHWC copies through shared-memory tiles (both sides
  coalesced), casting float32 <-> bfloat16 on the way when asked;
- casts and the ReLU gradient fused with the cast (conv backward), the ReLU
  gradient and bias + ReLU on bfloat16 blobs, and `as_float32` / `assign` to
  read and write bfloat16 blobs as float32;
- the SGD update: momentum, weight decay and the step for every parameter
  blob in one launch (a table of device pointers, one grid row per blob).
bfloat16 arrays are held as uint16 (CuPy needs no bfloat16 dtype for them):
float -> bf16 rounds to nearest even, bf16 -> float is exact.
Imported only on the GPU path.
"""
import functools

import cupy
import numpy as np

BF16 = np.dtype(np.uint16)

_CONVERT = r"""
__device__ __forceinline__ float load_f(const float* p, long long i) { return p[i]; }
__device__ __forceinline__ float load_f(const unsigned short* p, long long i) {
    return __uint_as_float(((unsigned int)p[i]) << 16);
}
// The bfloat16 bits of v (low 16 bits): round to nearest even, NaN kept quiet.
__device__ __forceinline__ unsigned int bf16_bits(float v) {
    unsigned int u = __float_as_uint(v);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (u >> 16) | 0x40u;
    u += 0x7fffu + ((u >> 16) & 1u);
    return u >> 16;
}
__device__ __forceinline__ void store_f(float* p, long long i, float v) { p[i] = v; }
__device__ __forceinline__ void store_f(unsigned short* p, long long i, float v) {
    p[i] = (unsigned short)bf16_bits(v);
}
"""

_VEC8 = r"""
// 8 consecutive channels of a channels-last blob as float (vector loads and stores; the
// index is a multiple of 8, so the addresses are 16-byte (bf16) or 32-byte aligned).
__device__ __forceinline__ void load8(const float* p, float* v) {
    float4 a = reinterpret_cast<const float4*>(p)[0], b = reinterpret_cast<const float4*>(p)[1];
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w; v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
}
__device__ __forceinline__ void load8(const unsigned short* p, float* v) {
    uint4 a = *reinterpret_cast<const uint4*>(p);
    unsigned int u[4] = {a.x, a.y, a.z, a.w};
    #pragma unroll
    for (int k = 0; k < 4; ++k) {          // little-endian: channel 2k in the low half
        v[2 * k] = __uint_as_float(u[k] << 16);
        v[2 * k + 1] = __uint_as_float(u[k] & 0xffff0000u);
    }
}
__device__ __forceinline__ void store8(float* p, const float* v) {
    reinterpret_cast<float4*>(p)[0] = make_float4(v[0], v[1], v[2], v[3]);
    reinterpret_cast<float4*>(p)[1] = make_float4(v[4], v[5], v[6], v[7]);
}
__device__ __forceinline__ void store8(unsigned short* p, const float* v) {
    *reinterpret_cast<uint4*>(p) = make_uint4(bf16_bits(v[0]) | (bf16_bits(v[1]) << 16),
                                              bf16_bits(v[2]) | (bf16_bits(v[3]) << 16),
                                              bf16_bits(v[4]) | (bf16_bits(v[5]) << 16),
                                              bf16_bits(v[6]) | (bf16_bits(v[7]) << 16));
}
"""

_TRANSPOSE = _CONVERT + r"""
// y[b][j][i] = x[b][i][j] for a batch of (rows, cols) matrices; ACCUMULATE adds.
extern "C" __global__ void transpose(const IN_T* x, OUT_T* y, int rows, int cols) {
    __shared__ float tile[32][33];
    long long base = (long long)blockIdx.z * rows * cols;
    int r0 = blockIdx.y * 32, c0 = blockIdx.x * 32;
    for (int k = threadIdx.y; k < 32; k += 8) {
        int r = r0 + k, c = c0 + threadIdx.x;
        if (r < rows && c < cols) tile[k][threadIdx.x] = load_f(x, base + (long long)r * cols + c);
    }
    __syncthreads();
    for (int k = threadIdx.y; k < 32; k += 8) {
        int c = c0 + k, r = r0 + threadIdx.x;
        if (r < rows && c < cols) {
            long long o = base + (long long)c * rows + r;
            float v = tile[threadIdx.x][k];
            if (ACCUMULATE) v += load_f(y, o);
            store_f(y, o, v);
        }
    }
}
"""

_SGD = r"""
// One grid row per parameter blob: Caffe's SGD with momentum, in Caffe's order
// of float32 roundings (no fused multiply-adds):
// g = diff / iter_size + decay * (w | sign(w)); h = momentum * h + lr * g; w -= h.
extern "C" __global__ void sgd_momentum(
        const unsigned long long* data, const unsigned long long* diff, const unsigned long long* hist,
        const long long* sizes, const float* rates, const float* decays,
        float momentum, float iter_size, int l1) {
    int p = blockIdx.y;
    float* w = (float*)data[p];
    const float* g = (const float*)diff[p];
    float* h = (float*)hist[p];
    long long n = sizes[p];
    float rate = rates[p], decay = decays[p];
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        float wi = w[i];
        float gi = iter_size != 1.0f ? __fdiv_rn(g[i], iter_size) : g[i];
        if (decay != 0.0f) {
            float r = l1 ? (float)((wi > 0.0f) - (wi < 0.0f)) : wi;
            gi = __fadd_rn(gi, __fmul_rn(decay, r));
        }
        float hi = __fadd_rn(__fmul_rn(momentum, h[i]), __fmul_rn(rate, gi));
        h[i] = hi;
        w[i] = __fsub_rn(wi, hi);
    }
}
"""

_C_TYPES = {np.dtype(np.float32): "float", BF16: "unsigned short"}


@functools.lru_cache(maxsize=None)
def _transpose_kernel(in_dtype, out_dtype, accumulate):
    code = (_TRANSPOSE.replace("IN_T", _C_TYPES[np.dtype(in_dtype)])
            .replace("OUT_T", _C_TYPES[np.dtype(out_dtype)])
            .replace("ACCUMULATE", "1" if accumulate else "0"))
    return cupy.RawKernel(code, "transpose")


def batched_transpose(x, y, batch, rows, cols, accumulate=False):
    """y (batch, cols, rows) = x (batch, rows, cols), both contiguous buffers; casts
    between float32 and bf16 (uint16) as their dtypes say; adds when accumulate."""
    kernel = _transpose_kernel(x.dtype.str, y.dtype.str, accumulate)
    grid = ((cols + 31) // 32, (rows + 31) // 32, batch)
    kernel(grid, (32, 8, 1), (x, y, np.int32(rows), np.int32(cols)))


def nchw_to_nhwc(x, out):
    """out: a contiguous (N, H, W, C) buffer (float32 or bf16) filled from x (N, C, H, W) contiguous."""
    n, c, h, w = x.shape
    batched_transpose(x, out, n, c, h * w)
    return out


def nhwc_to_nchw(x, out, accumulate=False):
    """out (N, C, H, W) contiguous float32 = (or +=) x, a contiguous (N, H, W, C) buffer."""
    n, c, h, w = out.shape
    batched_transpose(x, out, n, h * w, c, accumulate)
    return out


to_bf16 = cupy.ElementwiseKernel(
    "float32 x", "uint16 y",
    "unsigned int u = __float_as_uint(x);"
    "if ((u & 0x7fffffffu) > 0x7f800000u) y = (u >> 16) | 0x40u;"
    "else y = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;",
    "vggcaffe_to_bf16")

from_bf16 = cupy.ElementwiseKernel(
    "uint16 x", "float32 y", "y = __uint_as_float(((unsigned int)x) << 16)", "vggcaffe_from_bf16")

relu_grad = cupy.ElementwiseKernel(
    "float32 dy, float32 y", "float32 dz", "dz = y > 0.0f ? dy : 0.0f", "vggcaffe_relu_grad")

relu_grad_bf16 = cupy.ElementwiseKernel(
    "float32 dy, float32 y", "uint16 dz",
    "float v = y > 0.0f ? dy : 0.0f;"
    "unsigned int u = __float_as_uint(v);"
    "if ((u & 0x7fffffffu) > 0x7f800000u) dz = (u >> 16) | 0x40u;"
    "else dz = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;",
    "vggcaffe_relu_grad_bf16")

relu_grad_bf16_inplace = cupy.ElementwiseKernel(
    "uint16 y", "uint16 dz", "if (!(__uint_as_float(((unsigned int)y) << 16) > 0.0f)) dz = 0",
    "vggcaffe_relu_grad_bf16_inplace")

bias_relu_bf16 = cupy.ElementwiseKernel(
    "float32 b, bool relu", "uint16 y",
    "float v = __uint_as_float(((unsigned int)y) << 16) + b;"
    "if (relu && v < 0.0f) v = 0.0f;"
    "unsigned int u = __float_as_uint(v);"
    "if ((u & 0x7fffffffu) > 0x7f800000u) y = (u >> 16) | 0x40u;"
    "else y = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;",
    "vggcaffe_bias_relu_bf16")


def as_float32(a):
    """A float32 copy of a blob array (bfloat16 blobs hold uint16 bits), any strides."""
    if a.dtype == BF16:
        return from_bf16(a)
    return a.astype(np.float32)


def assign(a, values):
    """a[...] = values for float32 or bfloat16 (uint16) arrays of any strides."""
    values = cupy.asarray(values, dtype=np.float32)
    if a.dtype == BF16:
        to_bf16(cupy.broadcast_to(values, a.shape), a)
    else:
        a[...] = values


_sgd_kernel = cupy.RawKernel(_SGD, "sgd_momentum")


class FusedSGD:
    """Caffe's SGD step for a list of float32 CuPy param blobs in one kernel launch."""

    def __init__(self):
        self._tables = None
        self._key = None
        self._factors = (None, None)       # (host rates and decays, their device copies)

    @staticmethod
    def applies(blobs, history):
        return bool(blobs) and all(
            isinstance(a, cupy.ndarray) and a.dtype == np.float32 and a.flags.c_contiguous
            for b, h in zip(blobs, history) for a in (b.data, b.diff, h))

    def _pointer_tables(self, blobs, history):
        key = tuple((b.data.data.ptr, b.diff.data.ptr, h.data.ptr, b.count) for b, h in zip(blobs, history))
        if key != self._key:
            ptrs = np.array([k[:3] for k in key], dtype=np.uint64)
            self._tables = [cupy.asarray(np.ascontiguousarray(ptrs[:, i])) for i in range(3)]
            self._tables.append(cupy.asarray(np.array([k[3] for k in key], dtype=np.int64)))
            self._key = key
        return self._tables

    def __call__(self, blobs, history, rates, decays, momentum, iter_size, l1):
        """rates[i] = lr * lr_mult, decays[i] = weight_decay * decay_mult of blob i."""
        data, diff, hist, sizes = self._pointer_tables(blobs, history)
        key = (tuple(rates), tuple(decays))
        if key != self._factors[0]:        # a host-to-device copy waits for the queued work: only on change
            self._factors = (key, [cupy.asarray(np.asarray(f, dtype=np.float32)) for f in key])
        rates, decays = self._factors[1]
        longest = max(b.count for b in blobs)
        grid = (min((longest + 255) // 256, 2048), len(blobs), 1)
        _sgd_kernel(grid, (256, 1, 1), (data, diff, hist, sizes, rates, decays, np.float32(momentum),
                                        np.float32(iter_size), np.int32(1 if l1 else 0)))
