"""The GPU's CUDA kernels, run on the CPU (tests/cuda_on_cpu.py): MAX pooling (the
8-channel vector kernels and the general ones) and the small-C direct convolution,
against NumPy, in float32 and bfloat16. Skipped where no g++ is installed; the same
kernels run on a GPU in tests/test_gpu.py.
"""
import numpy as np
import pytest
from google.protobuf import text_format

from vggcaffe import backend
from vggcaffe.blob import Blob
from vggcaffe.layers import LAYER_TYPES
from vggcaffe.proto import caffe_pb2

from .cuda_on_cpu import (COMPILER, bf16_bits, channels_last, compile_kernel, from_bf16_bits, gpu_modules, launch,
                          round_bf16)

pytestmark = pytest.mark.skipif(COMPILER is None, reason="needs g++ to compile the CUDA sources for the CPU")
F32, BF16 = np.dtype(np.float32), np.dtype(np.uint16)


@pytest.fixture(scope="module")
def gpu(tmp_path_factory):
    with gpu_modules() as modules:
        modules.build_dir = tmp_path_factory.mktemp("cuda_on_cpu")
        yield modules


def device(values, dtype, shape=None):
    """`values` (N, C, H, W) float32 as a channels-last array of `dtype` (bf16 as bits)."""
    out = channels_last(values.shape if shape is None else shape, dtype)
    out[...] = bf16_bits(values) if dtype == BF16 else values
    return out


def host(array):
    return from_bf16_bits(array) if array.dtype == BF16 else array


def strides(a):
    return [np.int64(s // a.itemsize) for s in a.strides]


@pytest.mark.parametrize("pool,shape", [("kernel_size: 2 stride: 2", (2, 16, 8, 8)),
                                        ("kernel_size: 2 stride: 2", (2, 16, 9, 7)),
                                        ("kernel_size: 3 stride: 2 pad: 1", (2, 24, 9, 7)),
                                        ("kernel_size: 2 stride: 2", (2, 5, 8, 8))])
@pytest.mark.parametrize("x_dtype,y_dtype", [(F32, F32), (BF16, BF16), (BF16, F32)])
@pytest.mark.parametrize("relu_mask", [False, True])
def test_max_pool_kernels(gpu, pool, shape, x_dtype, y_dtype, relu_mask):
    """Forward (top and argmax) and backward (with the folded ReLU's mask or not) of the
    kernels MaxPoolGPU picks for channels-last blobs: the 8-channel ones where C % 8 == 0."""
    backend.set_mode_cpu()
    param = text_format.Parse(f"name: 'p' type: 'Pooling' pooling_param {{ pool: MAX {pool} }}",
                              caffe_pb2.LayerParameter())
    ref = LAYER_TYPES["Pooling"](param, phase="TRAIN", dtype=np.float32, rng=np.random.default_rng(0))
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    x = np.maximum(x, 0) if relu_mask else x
    x = round_bf16(x) if x_dtype == BF16 else x
    bottom, top = Blob(shape, xp=np), Blob((), xp=np)
    bottom.data[...] = x
    ref.setup([bottom], [top])
    ref.forward([bottom], [top])
    fast = gpu.pooling.MaxPoolGPU(ref)
    gx, gy = device(x, x_dtype), channels_last(top.shape, y_dtype)
    argmax = np.zeros(gy.size, np.uint8)
    vec = shape[1] % 8 == 0
    name = "max_pool_forward_vec" if vec else "max_pool_forward"
    kernel = compile_kernel(gpu.pooling._kernel(name, False, T_X=x_dtype.str, T_Y=y_dtype.str).code, name,
                            gpu.build_dir)
    layout = [] if vec else strides(gx) + strides(gy) + [np.int32(1)]
    launch(kernel, [gx, gy, argmax, np.int64(gy.size // 8 if vec else gy.size), *fast._args(gx)] + layout)
    want = round_bf16(top.data) if y_dtype == BF16 else top.data
    np.testing.assert_array_equal(host(gy), want)

    dy = np.random.default_rng(2).standard_normal(top.shape).astype(np.float32)
    dy = round_bf16(dy) if y_dtype == BF16 else dy
    top.diff[...] = dy * (top.data > 0) if relu_mask else dy
    ref.backward([top], [True], [bottom])
    tiled = (ref.kh, ref.kw) == (ref.sh, ref.sw) and ref.ph == ref.pw == 0
    name = ("max_pool_backward_tiled_vec" if vec else "max_pool_backward_tiled") if tiled else "max_pool_backward"
    gdy, gdx = device(dy, y_dtype), channels_last(shape, x_dtype)
    gdx[...] = 7                                          # every element must be written
    kernel = compile_kernel(gpu.pooling._kernel(name, False, relu_mask, T_DY=y_dtype.str, T_Y=y_dtype.str,
                                                T_DX=x_dtype.str).code, name, gpu.build_dir)
    layout = [] if tiled and vec else strides(gdy) + strides(gdx) + [np.int32(1)]
    total = gdy.size // 8 if tiled and vec else (gdy.size if tiled else gdx.size)
    launch(kernel, [gdy, gy, argmax, gdx, np.int64(total), *fast._args(gdx)] + layout)
    want = round_bf16(bottom.diff) if x_dtype == BF16 else bottom.diff
    np.testing.assert_allclose(host(gdx), want, rtol=1e-2 if x_dtype == BF16 else 1e-6, atol=1e-6)


def conv_reference(x, w, b, stride, pad):
    """float64 convolution of x (N, C, H, W) with w (K, C, kh, kw) plus b."""
    (sh, sw), (ph, pw) = stride, pad
    n, c, h, wd = x.shape
    k, _, kh, kw = w.shape
    oh, ow = (h + 2 * ph - kh) // sh + 1, (wd + 2 * pw - kw) // sw + 1
    padded = np.zeros((n, c, h + 2 * ph, wd + 2 * pw))
    padded[:, :, ph:ph + h, pw:pw + wd] = x
    y = np.zeros((n, k, oh, ow)) + b[None, :, None, None]
    for i in range(kh):
        for j in range(kw):
            y += np.einsum("nchw,kc->nkhw", padded[:, :, i:i + sh * oh:sh, j:j + sw * ow:sw], w[:, :, i, j])
    return y


@pytest.mark.parametrize("shape,k,kernel,stride,pad", [((2, 3, 10, 9), 16, (3, 3), (1, 1), (1, 1)),
                                                       ((1, 3, 7, 8), 8, (3, 3), (2, 2), (1, 1)),
                                                       ((2, 1, 6, 6), 24, (5, 3), (1, 2), (2, 0))])
@pytest.mark.parametrize("x_dtype,y_dtype", [(F32, F32), (BF16, BF16), (BF16, F32)])
@pytest.mark.parametrize("relu,bias", [(False, True), (True, True), (True, False)])
def test_small_c_convolution(gpu, shape, k, kernel, stride, pad, x_dtype, y_dtype, relu, bias):
    """conv_small_c: relu?(conv(x, w) + b) from the compute-type NHWC copies cuDNN gets (bf16
    ones zero-padded to 8 channels) into a channels-last top."""
    rng = np.random.default_rng(0)
    n, c, h, w = shape
    x = rng.standard_normal(shape).astype(np.float32)
    wt = (rng.standard_normal((k, c) + kernel) * 0.3).astype(np.float32)
    b = rng.standard_normal(k).astype(np.float32) if bias else np.zeros(k, np.float32)
    if x_dtype == BF16:
        x, wt = round_bf16(x), round_bf16(wt)
    cp = 8 if x_dtype == BF16 else c
    x_io = np.zeros((n, h, w, cp), x_dtype)
    w_io = np.zeros((k,) + kernel + (cp,), x_dtype)
    x_io[..., :c] = bf16_bits(x.transpose(0, 2, 3, 1)) if x_dtype == BF16 else x.transpose(0, 2, 3, 1)
    w_io[..., :c] = bf16_bits(wt.transpose(0, 2, 3, 1)) if x_dtype == BF16 else wt.transpose(0, 2, 3, 1)
    want = conv_reference(x.astype(np.float64), wt.astype(np.float64), b.astype(np.float64), stride, pad)
    want = np.maximum(want, 0) if relu else want
    y = channels_last(want.shape, y_dtype)
    y[...] = 7
    fn = compile_kernel(gpu.small_c.forward_kernel(x_dtype.str, y_dtype.str, False).code, "conv_small_c",
                        gpu.build_dir)
    _, _, oh, ow = want.shape
    launch(fn, [x_io, w_io, b, y, np.int64(n * oh * ow * (k // 8)), c, cp, h, w, k, oh, ow, *kernel, *stride, *pad,
                int(bias), int(relu)])
    error = np.abs(host(y) - want).max() / np.abs(want).max()
    assert error <= (4e-3 if y_dtype == BF16 else 1e-6), error


@pytest.mark.parametrize("pool,shape", [("kernel_size: 2 stride: 2", (2, 16, 9, 7)),
                                        ("kernel_size: 3 stride: 2 pad: 1", (2, 8, 9, 7)),
                                        ("kernel_size: 2 stride: 2", (2, 6, 8, 8))])
@pytest.mark.parametrize("channels_last_blobs", [False, True])
def test_max_pool_layer_host_code(gpu, pool, shape, channels_last_blobs):
    """MaxPoolGPU itself (its choice of kernel, arguments and sizes) on NumPy blobs, with the
    folded ReLU's mask: the Pooling layer's top and bottom diff."""
    backend.set_mode_cpu()
    param = text_format.Parse(f"name: 'p' type: 'Pooling' pooling_param {{ pool: MAX {pool} }}",
                              caffe_pb2.LayerParameter())
    x = np.maximum(np.random.default_rng(3).standard_normal(shape), 0).astype(np.float32)
    layers, blobs = [], []
    for fast in (False, True):
        layer = LAYER_TYPES["Pooling"](param, phase="TRAIN", dtype=np.float32, rng=np.random.default_rng(0))
        bottom, top = Blob(shape, xp=np), Blob((), xp=np)
        if fast and channels_last_blobs:
            bottom.make_channels_last()
        bottom.data[...] = x
        layer.setup([bottom], [top])
        if fast:
            layer = gpu.pooling.MaxPoolGPU(layer)
            layer.channels_last = channels_last_blobs
            layer.relu_mask = True
            layer.reshape([bottom], [top])
        layer.forward([bottom], [top])
        top.diff[...] = np.random.default_rng(4).standard_normal(top.shape).astype(np.float32)
        if not fast:
            top.diff[...] *= top.data > 0                 # the ReLU backward the fast layer does
        layer.backward([top], [True], [bottom])
        layers.append(layer)
        blobs.append((bottom, top))
    (bottom, top), (fast_bottom, fast_top) = blobs
    np.testing.assert_array_equal(fast_top.data, top.data)
    np.testing.assert_allclose(fast_bottom.diff, bottom.diff, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("text", ["num_output: 16 kernel_size: 3 pad: 1",
                                  "num_output: 8 kernel_size: 3 stride: 2 pad: 1 bias_term: false"])
@pytest.mark.parametrize("fused_relu", [False, True])
def test_small_c_convolution_host_code(gpu, text, fused_relu):
    """CudnnConv's direct path itself (when it applies, its arguments) on a NumPy layer: the
    top of the NumPy convolution (and ReLU)."""
    backend.set_mode_cpu()
    param = text_format.Parse(f"name: 'c' type: 'Convolution' convolution_param {{ {text} "
                              f"weight_filler {{ type: 'gaussian' std: 0.3 }} bias_filler {{ type: 'gaussian' std: 0.3 }} }}",
                              caffe_pb2.LayerParameter())
    layer = LAYER_TYPES["Convolution"](param, phase="TEST", dtype=np.float32, rng=np.random.default_rng(5))
    x = np.random.default_rng(6).standard_normal((2, 3, 9, 8)).astype(np.float32)
    bottom, top = Blob(x.shape, xp=np), Blob((), xp=np)
    bottom.data[...] = x
    layer.setup([bottom], [top])
    layer.forward([bottom], [top])
    want = np.maximum(top.data, 0) if fused_relu else top.data
    layer.fused_relu = fused_relu
    direct = gpu.conv.CudnnConv(layer)
    y = channels_last(top.shape, F32)
    assert direct._small_c_applies(y) and not direct._small_c_applies(np.zeros(top.shape, np.float32))
    w_io = np.ascontiguousarray(layer.blobs[0].data.transpose(0, 2, 3, 1))
    direct._fprop_small_c(np.ascontiguousarray(x.transpose(0, 2, 3, 1)), w_io, y)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape,k,kernel,stride,pad", [((2, 3, 10, 9), 16, (3, 3), (1, 1), (1, 1)),
                                                       ((1, 3, 7, 8), 8, (3, 3), (2, 2), (1, 1)),
                                                       ((2, 1, 6, 6), 24, (5, 3), (1, 2), (2, 0))])
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_small_c_weight_gradient(gpu, monkeypatch, shape, k, kernel, stride, pad, dtype):
    """CudnnConv._wgrad_small_c (partial sums over pixel chunks, two fixed-order reduction
    stages) gives dW = sum over pixels of dZ x the input patch, from the NHWC compute-type
    copies cuDNN's wgrad gets; chunks smaller than the pixel count, so the stages add up."""
    backend.set_mode_cpu()
    monkeypatch.setattr(gpu.small_c, "WGRAD_CHUNK", 7)
    monkeypatch.setattr(gpu.small_c, "WGRAD_SLICES", 3)
    monkeypatch.setattr(gpu.conv.cc, "scratch", lambda slot, shape, dtype: np.zeros(shape, dtype))
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, pad
    text = (f"num_output: {k} kernel_h: {kh} kernel_w: {kw} stride_h: {sh} stride_w: {sw} pad_h: {ph} pad_w: {pw} "
            f"weight_filler {{ type: 'gaussian' std: 0.3 }}")
    param = text_format.Parse(f"name: 'c' type: 'Convolution' convolution_param {{ {text} }}", caffe_pb2.LayerParameter())
    layer = LAYER_TYPES["Convolution"](param, phase="TRAIN", dtype=np.float32, rng=np.random.default_rng(5))
    rng = np.random.default_rng(7)
    x = rng.standard_normal(shape).astype(np.float32)
    bottom, top = Blob(shape, xp=np), Blob((), xp=np)
    bottom.data[...] = x
    layer.setup([bottom], [top])
    dz = rng.standard_normal(top.shape).astype(np.float32)
    if dtype == BF16:
        x, dz = round_bf16(x), round_bf16(dz)
    bottom.data[...] = x
    top.diff[...] = dz
    layer.blobs[0].diff[...] = 0
    layer.backward([top], [False], [bottom])               # NumPy's dW
    cp = 8 if dtype == BF16 else shape[1]
    x_io = np.zeros(x.transpose(0, 2, 3, 1).shape[:3] + (cp,), dtype)
    x_io[..., :shape[1]] = bf16_bits(x.transpose(0, 2, 3, 1)) if dtype == BF16 else x.transpose(0, 2, 3, 1)
    dz_io = np.ascontiguousarray(bf16_bits(dz.transpose(0, 2, 3, 1)) if dtype == BF16 else dz.transpose(0, 2, 3, 1))
    dw = gpu.conv.CudnnConv(layer)._wgrad_small_c(x_io, dz_io)     # (K, kh, kw, C)
    want = layer.blobs[0].diff
    np.testing.assert_allclose(dw.transpose(0, 3, 1, 2), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
