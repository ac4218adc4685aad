"""MAX pooling on the GPU: one kernel pass forward, one backward, for blobs of any
strides (channels-last or NCHW) in float32 or bfloat16, Caffe's semantics
(ceil-mode sizes from the wrapped PoolingLayer, windows clipped to the input,
the first maximum in (h, w) scan order wins). `prepare_net` puts it in place of
MAX Pooling layers of GPU nets, makes its top channels-last when every consumer
takes any strides (so conv -> pool -> conv never transposes), and may hand it
the folded ReLU's backward of the convolution before it.
Forward keeps each maximum's place in its window as one byte. Backward writes
every bottom element once, with no atomics and no zeroing pass: one thread per
window where the windows tile the bottom (VGG's 2x2, stride 2), else one thread
per bottom element gathering dY from the windows it won (Caffe's GPU scheme).
Threads run with c fastest on channels-last blobs, w fastest otherwise, so reads
and writes are coalesced either way. Where every blob is channels-last and C is a
multiple of 8 (VGG's), a thread takes 8 channels at once: 16- or 32-byte vector
loads and stores instead of 2- or 4-byte ones (`max_pool_forward_vec`,
`max_pool_backward_tiled_vec`; same results, same argmax layout).
"""
import functools
import os

import cupy
import numpy as np

from ..layers.base import Layer
from . import cudnn_conv as cc
from .kernels import _C_TYPES, _CONVERT, _VEC8

VECTOR = os.environ.get("VGGCAFFE_POOL_VECTOR", "1") != "0"   # the 8-channel kernels where they apply
_COMMON = _CONVERT + r"""
// Index t over (n, c, h, w) with c fastest (channels-last memory) or w fastest (NCHW);
// idx_t is 32-bit where the element count allows (64-bit division is slow on GPUs).
typedef IDX_T idx_t;
#define DECOMPOSE(t, C, H, W) \
    idx_t r = (idx_t)t; int n, c, h, w; \
    if (c_fastest) { c = r % C; r /= C; w = r % W; r /= W; h = r % H; n = (int)(r / H); } \
    else { w = r % W; r /= W; h = r % H; r /= H; c = r % C; n = (int)(r / C); }
// Output (h, w)'s window: unclipped corner (hs, ws); rows h0..h1-1 and columns w0..w1-1 inside the input.
#define WINDOW(h, w) \
    int hs = h * sh - ph, ws = w * sw - pw; \
    int h1 = min(hs + kh, H), w1 = min(ws + kw, W); \
    int h0 = max(hs, 0), w0 = max(ws, 0);
"""

_FORWARD = _COMMON + r"""
// y = the window's maximum; argmax = its place in the unclipped kh x kw window (row-major),
// the first maximum in scan order; 255 for a window that covers no input.
extern "C" __global__ void max_pool_forward(
        const T_X* x, T_Y* y, unsigned char* argmax, long long total, int C, int H, int W, int OH, int OW,
        int kh, int kw, int sh, int sw, int ph, int pw,
        long long xn, long long xc, long long xh, long long xw,
        long long yn, long long yc, long long yh, long long yw, int c_fastest) {
    for (long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x; t < total;
         t += (long long)gridDim.x * blockDim.x) {
        DECOMPOSE(t, C, OH, OW)
        WINDOW(h, w)
        long long plane = n * xn + c * xc;
        float best = 0.0f;
        int where = 255;
        for (int i = h0; i < h1; ++i)
            for (int j = w0; j < w1; ++j) {
                float v = load_f(x, plane + i * xh + j * xw);
                if (where == 255 || v > best) { best = v; where = (i - hs) * kw + (j - ws); }
            }
        store_f(y, n * yn + c * yc + h * yh + w * yw, best);
        argmax[t] = (unsigned char)where;
    }
}
"""

# The two backward kernels' parameters and grid-stride loop: MaxPoolGPU.backward passes
# one argument tuple to either.
_BACKWARD_HEAD = r"""(
        const T_DY* dy, const T_Y* y, const unsigned char* argmax, T_DX* dx, long long total,
        int C, int H, int W, int OH, int OW, int kh, int kw, int sh, int sw, int ph, int pw,
        long long yn, long long yc, long long yh, long long yw,
        long long xn, long long xc, long long xh, long long xw, int c_fastest) {
    for (long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x; t < total;
         t += (long long)gridDim.x * blockDim.x) {
"""

_BACKWARD = _COMMON + r"""
// One thread per bottom element: dx = the sum of dy over the windows whose maximum it is
// (times Y > 0 there when RELU_MASK: the folded ReLU's backward). No atomics, no zeroing.
extern "C" __global__ void max_pool_backward""" + _BACKWARD_HEAD + r"""        DECOMPOSE(t, C, H, W)
        int hp = h + ph, wp = w + pw;
        int oh0 = hp < kh ? 0 : (hp - kh) / sh + 1, oh1 = min(hp / sh + 1, OH);
        int ow0 = wp < kw ? 0 : (wp - kw) / sw + 1, ow1 = min(wp / sw + 1, OW);
        float g = 0.0f;
        for (int i = oh0; i < oh1; ++i)
            for (int j = ow0; j < ow1; ++j) {
                idx_t a = c_fastest ? (((idx_t)n * OH + i) * OW + j) * C + c
                                    : (((idx_t)n * C + c) * OH + i) * OW + j;
                if (argmax[a] != (hp - i * sh) * kw + (wp - j * sw)) continue;
                long long o = n * yn + c * yc + i * yh + j * yw;
                if (RELU_MASK && !(load_f(y, o) > 0.0f)) continue;
                g += load_f(dy, o);
            }
        store_f(dx, n * xn + c * xc + h * xh + w * xw, g);
    }
}
"""

_BACKWARD_TILED = _COMMON + r"""
// Windows that tile the bottom (kernel = stride, no pad, every element in a window): one
// thread per window writes its kh x kw bottom elements, dY (masked when RELU_MASK) at the
// maximum and 0 elsewhere; far fewer index divisions than one thread per bottom element.
extern "C" __global__ void max_pool_backward_tiled""" + _BACKWARD_HEAD + r"""        DECOMPOSE(t, C, OH, OW)
        int where = argmax[t];
        long long o = n * yn + c * yc + h * yh + w * yw;
        float g = load_f(dy, o);
        if (RELU_MASK && !(load_f(y, o) > 0.0f)) g = 0.0f;
        long long base = n * xn + c * xc;
        for (int i = 0; i < kh && h * kh + i < H; ++i)
            for (int j = 0; j < kw && w * kw + j < W; ++j)
                store_f(dx, base + (h * kh + i) * xh + (w * kw + j) * xw, i * kw + j == where ? g : 0.0f);
    }
}
"""
_FORWARD_VEC = _COMMON + _VEC8 + r"""
// max_pool_forward for channels-last x and y with C % 8 == 0: one thread per 8 channels of
// an output pixel; argmax at the same places as there (c fastest).
extern "C" __global__ void max_pool_forward_vec(
        const T_X* x, T_Y* y, unsigned char* argmax, long long total, int C, int H, int W, int OH, int OW,
        int kh, int kw, int sh, int sw, int ph, int pw) {
    const int c_fastest = 1, C8 = C / 8;
    for (long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x; t < total;
         t += (long long)gridDim.x * blockDim.x) {
        DECOMPOSE(t, C8, OH, OW)
        WINDOW(h, w)
        float best[8], v[8];
        int where[8];
        #pragma unroll
        for (int k = 0; k < 8; ++k) { best[k] = 0.0f; where[k] = 255; }
        for (int i = h0; i < h1; ++i)
            for (int j = w0; j < w1; ++j) {
                load8(x + (((long long)n * H + i) * W + j) * C + c * 8, v);
                int place = (i - hs) * kw + (j - ws);
                #pragma unroll
                for (int k = 0; k < 8; ++k)
                    if (where[k] == 255 || v[k] > best[k]) { best[k] = v[k]; where[k] = place; }
            }
        long long o = (((long long)n * OH + h) * OW + w) * C + c * 8;
        store8(y + o, best);
        *reinterpret_cast<uint2*>(argmax + o) = make_uint2(
            (unsigned)where[0] | ((unsigned)where[1] << 8) | ((unsigned)where[2] << 16) | ((unsigned)where[3] << 24),
            (unsigned)where[4] | ((unsigned)where[5] << 8) | ((unsigned)where[6] << 16) | ((unsigned)where[7] << 24));
    }
}
"""

_BACKWARD_TILED_VEC = _COMMON + _VEC8 + r"""
// max_pool_backward_tiled for channels-last dY, Y and dX with C % 8 == 0: one thread per
// 8 channels of a window.
extern "C" __global__ void max_pool_backward_tiled_vec(
        const T_DY* dy, const T_Y* y, const unsigned char* argmax, T_DX* dx, long long total,
        int C, int H, int W, int OH, int OW, int kh, int kw, int sh, int sw, int ph, int pw) {
    const int c_fastest = 1, C8 = C / 8;
    for (long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x; t < total;
         t += (long long)gridDim.x * blockDim.x) {
        DECOMPOSE(t, C8, OH, OW)
        long long o = (((long long)n * OH + h) * OW + w) * C + c * 8;
        float g[8], out[8];
        load8(dy + o, g);
        if (RELU_MASK) {
            float yv[8];
            load8(y + o, yv);
            #pragma unroll
            for (int k = 0; k < 8; ++k) if (!(yv[k] > 0.0f)) g[k] = 0.0f;
        }
        uint2 a = *reinterpret_cast<const uint2*>(argmax + o);
        int where[8];
        #pragma unroll
        for (int k = 0; k < 4; ++k) { where[k] = (a.x >> (8 * k)) & 0xff; where[k + 4] = (a.y >> (8 * k)) & 0xff; }
        for (int i = 0; i < kh && h * kh + i < H; ++i)
            for (int j = 0; j < kw && w * kw + j < W; ++j) {
                #pragma unroll
                for (int k = 0; k < 8; ++k) out[k] = i * kw + j == where[k] ? g[k] : 0.0f;
                store8(dx + (((long long)n * H + h * kh + i) * W + w * kw + j) * C + c * 8, out);
            }
    }
}
"""
_CODE = {"max_pool_forward": _FORWARD, "max_pool_backward": _BACKWARD, "max_pool_backward_tiled": _BACKWARD_TILED,
         "max_pool_forward_vec": _FORWARD_VEC, "max_pool_backward_tiled_vec": _BACKWARD_TILED_VEC}


@functools.lru_cache(maxsize=None)
def _kernel(name, wide, relu_mask=False, **dtypes):
    """The forward or backward kernel for these array dtypes (T_X=..., T_Y=..., as dtype
    strings), with 64-bit element indices when `wide`."""
    code = _CODE[name]
    for placeholder, dtype in dtypes.items():
        code = code.replace(placeholder, _C_TYPES[np.dtype(dtype)])
    code = code.replace("IDX_T", "long long" if wide else "unsigned int")
    return cupy.RawKernel(code.replace("RELU_MASK", "1" if relu_mask else "0"), name)


def applies(layer, bottom, top):
    from ..layers.pooling import P
    if layer.type != "Pooling" or isinstance(layer, MaxPoolGPU) or layer.pool != P.MAX or len(top) != 1:
        return False
    x = bottom[0].template
    return (isinstance(x, cupy.ndarray) and x.dtype == np.float32 and x.ndim == 4
            and not layer.global_pooling and layer.kh * layer.kw < 255)


def _strides(a):
    return [np.int64(s // a.itemsize) for s in a.strides]


def _grid(total):
    return (int(min((total + 255) // 256, 1 << 20)), 1, 1), (256, 1, 1)


def _vectorized(*arrays):
    """The 8-channel kernels apply: every array channels-last, with C a multiple of 8 (and
    VGGCAFFE_POOL_VECTOR is not 0)."""
    return VECTOR and all(a.shape[1] % 8 == 0 and cc.is_channels_last(a) for a in arrays)


class MaxPoolGPU(Layer):
    """A MAX PoolingLayer's GPU stand-in (same param, shapes and results).

    Set by `prepare_net`: channels_last (the top is NHWC-strided), top_dtype
    (float32, or bfloat16 held as uint16 between bf16 convolutions), relu_mask
    (the bottom is a folded ReLU's output, whose backward this layer does)."""
    type = "Pooling"

    def __init__(self, pool):
        super().__init__(pool.param, phase=pool.phase, dtype=pool.dtype, rng=pool.rng)
        self.pool = pool
        self.channels_last = self.relu_mask = False
        self.top_dtype = np.dtype(np.float32)
        self.argmax = None

    def reshape(self, bottom, top):
        self.pool.reshape(bottom, top)
        if self.channels_last:
            top[0].make_channels_last(dtype=self.top_dtype)

    def _args(self, x):
        p = self.pool
        n, c, h, w = x.shape
        return (np.int32(c), np.int32(h), np.int32(w), np.int32(p.oh), np.int32(p.ow), np.int32(p.kh),
                np.int32(p.kw), np.int32(p.sh), np.int32(p.sw), np.int32(p.ph), np.int32(p.pw))

    def forward(self, bottom, top):
        x, y = bottom[0].data, top[0].data                               # (N, C, H, W), (N, C, oh, ow)
        self.c_fastest = np.int32(cc.is_channels_last(x))
        if self.argmax is None or self.argmax.size != y.size:
            self.argmax = cupy.empty(y.size, np.uint8)
        vec = _vectorized(x, y)
        kernel = _kernel("max_pool_forward_vec" if vec else "max_pool_forward", x.size >= 2**31,
                         T_X=x.dtype.str, T_Y=y.dtype.str)
        total = y.size // 8 if vec else y.size
        layout = () if vec else (*_strides(x), *_strides(y), self.c_fastest)
        grid, block = _grid(total)
        kernel(grid, block, (x, y, self.argmax, np.int64(total), *self._args(x), *layout))

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        dy, y, dx = top[0].diff, top[0].data, bottom[0].diff            # (N, C, oh, ow), (N, C, H, W)
        p = self.pool
        tiled = ((p.kh, p.kw) == (p.sh, p.sw) and p.ph == p.pw == 0
                 and p.oh * p.kh >= dx.shape[2] and p.ow * p.kw >= dx.shape[3])
        vec = tiled and bool(self.c_fastest) and _vectorized(dy, y, dx)   # argmax c-fastest
        if vec:
            name, total, layout = "max_pool_backward_tiled_vec", dy.size // 8, ()
        else:
            name, total = ("max_pool_backward_tiled", dy.size) if tiled else ("max_pool_backward", dx.size)
            layout = (*_strides(dy), *_strides(dx), self.c_fastest)
        kernel = _kernel(name, dx.size >= 2**31, self.relu_mask, T_DY=dy.dtype.str, T_Y=y.dtype.str,
                         T_DX=dx.dtype.str)
        grid, block = _grid(total)
        kernel(grid, block, (dy, y, self.argmax, dx, np.int64(total), *self._args(dx), *layout))
