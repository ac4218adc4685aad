"""GPU backend against the NumPy path: every layer, the cuDNN convolution in each
precision (with its fused ReLU and channels-last variants), the kernels, the
fused SGD update and a whole VGG-16 forward+backward, on the same inputs.

Errors are ||gpu - cpu|| / ||cpu|| per array; bounds: fp32 1e-5, tf32 5e-3,
bf16 3e-2. Runs only where CuPy sees a CUDA GPU (the device machine).
"""
import os
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format

cupy = pytest.importorskip("cupy", reason="GPU tests need CuPy (pip install vggcaffe[gpu])")


def _gpu_count():
    try:
        return cupy.cuda.runtime.getDeviceCount()
    except Exception:  # no driver or no device: CuPy raises its runtime error
        return 0


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_gpu_count() == 0, reason="no CUDA GPU visible to CuPy")]

from vggcaffe import backend  # noqa: E402
from vggcaffe.blob import Blob  # noqa: E402
from vggcaffe.layers import LAYER_TYPES  # noqa: E402
from vggcaffe.proto import caffe_pb2  # noqa: E402

from .cuda_on_cpu import round_bf16  # noqa: E402

BOUND = {"fp32": 1e-5, "tf32": 5e-3, "bf16": 3e-2}


@pytest.fixture(autouse=True)
def cpu_mode_after():
    from vggcaffe.gpu import conv_layout, set_fp32_layout, set_precision
    layout = conv_layout("fp32")
    yield
    backend.set_mode_cpu()
    set_precision("fp32")
    set_fp32_layout(layout)


def rel_err(gpu, cpu):
    from vggcaffe.gpu.kernels import as_float32
    g = cupy.asnumpy(as_float32(gpu)).astype(np.float64)
    c = np.asarray(cpu, dtype=np.float64)
    assert g.shape == c.shape and np.all(np.isfinite(g))
    return np.linalg.norm(g - c) / max(np.linalg.norm(c), 1e-30)


def build(text, arrays, gpu, phase="TRAIN", n_tops=1, channels_last_bottom=False):
    """The layer on NumPy or CuPy blobs (same seed, so same fillers and dropout masks)."""
    (backend.set_mode_gpu if gpu else backend.set_mode_cpu)()
    param = text_format.Parse(text, caffe_pb2.LayerParameter())
    layer = LAYER_TYPES[param.type](param, phase=phase, dtype=np.float32, rng=np.random.default_rng(7))
    bottom = []
    for a in arrays:
        b = Blob(a.shape, dtype=np.float32)
        if gpu and channels_last_bottom and a.ndim == 4:
            b.make_channels_last()
        b.data[...] = b._xp.asarray(a)
        bottom.append(b)
    top = [Blob((), dtype=np.float32) for _ in range(n_tops)]
    layer.setup(bottom, top)
    return layer, bottom, top


def compare_layer(text, arrays, bound=1e-5, phase="TRAIN", n_tops=1, backward_bottoms=None,
                  precision="fp32", channels_last_bottom=False, setup_gpu=None):
    from vggcaffe.gpu import set_precision
    cpu, cb, ct = build(text, arrays, False, phase, n_tops)
    gpu, gb, gt = build(text, arrays, True, phase, n_tops, channels_last_bottom)
    set_precision(precision)
    for c, g in zip(cpu.blobs, gpu.blobs):
        g.data[...] = cupy.asarray(c.data)
    if setup_gpu:
        gpu = setup_gpu(gpu, gb, gt)
    cpu.forward(cb, ct)
    gpu.forward(gb, gt)
    for c, g in zip(ct, gt):
        assert rel_err(g.data, c.data) <= bound, f"{cpu.type} forward"
    if backward_bottoms is None:
        backward_bottoms = [True] * len(arrays)
    rng = np.random.default_rng(3)
    for c, g in zip(ct, gt):
        dy = rng.standard_normal(c.shape).astype(np.float32) if c.shape else np.float32(1.0)
        c.diff[...] = dy
        g.diff[...] = cupy.asarray(dy)
    cpu.backward(ct, backward_bottoms, cb)
    gpu.backward(gt, backward_bottoms, gb)
    for i, need in enumerate(backward_bottoms):
        if need:
            assert rel_err(gb[i].diff, cb[i].diff) <= bound, f"{cpu.type} bottom[{i}] diff"
    for j, (c, g) in enumerate(zip(cpu.blobs, gpu.blobs)):
        assert rel_err(g.diff, c.diff) <= bound, f"{cpu.type} param[{j}] diff"
    return cpu, gpu


def randn(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def to_bf16_blob(blob, values):
    """Make `blob` a channels-last bfloat16 blob holding `values` (rounded)."""
    from vggcaffe.gpu.kernels import BF16, assign
    blob.make_channels_last(dtype=BF16)
    assign(blob.data, values)


# --- kernels ----------------------------------------------------------------------
def test_layout_and_bf16_kernels():
    from vggcaffe.gpu import kernels
    x = randn(3, 5, 7, 9)
    out = cupy.empty((3, 7, 9, 5), np.float32)
    kernels.nchw_to_nhwc(cupy.asarray(x), out)
    np.testing.assert_array_equal(cupy.asnumpy(out), x.transpose(0, 2, 3, 1))
    back = cupy.full(x.shape, 2.0, np.float32)
    kernels.nhwc_to_nchw(out, back, accumulate=True)
    np.testing.assert_array_equal(cupy.asnumpy(back), x + 2.0)
    bits = x.view(np.uint32)
    expect = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)   # round to nearest even
    got = kernels.to_bf16(cupy.asarray(x))
    np.testing.assert_array_equal(cupy.asnumpy(got), expect)
    np.testing.assert_array_equal(cupy.asnumpy(kernels.from_bf16(got)),
                                  (expect.astype(np.uint32) << 16).view(np.float32))


@pytest.mark.parametrize("l1,iter_size", [(False, 1), (True, 2)])
def test_fused_sgd_matches_caffe_update(l1, iter_size):
    from vggcaffe.gpu.kernels import FusedSGD
    rng = np.random.default_rng(5)
    shapes, rates, decays = [(64, 3, 3, 3), (64,), (1000, 7)], [0.01, 0.02, 0.003], [5e-4, 0.0, 5e-4]
    blobs, hist_gpu, ref = [], [], []
    for shape in shapes:
        b = Blob(shape, np.float32, xp=cupy)
        w, g, h = (rng.standard_normal(shape).astype(np.float32) for _ in range(3))
        b.data[...], b.diff[...] = cupy.asarray(w), cupy.asarray(g)
        blobs.append(b)
        hist_gpu.append(cupy.asarray(h))
        ref.append((w, g, h))
    FusedSGD()(blobs, hist_gpu, rates, decays, 0.9, iter_size, l1)
    for b, hg, (w, g, h), rate, decay in zip(blobs, hist_gpu, ref, rates, decays):
        g = g / np.float32(iter_size) if iter_size > 1 else g
        if decay:
            g = g + decay * (np.sign(w) if l1 else w)
        h = h * np.float32(0.9)
        h = h + np.float32(rate) * g
        w = w - h
        np.testing.assert_allclose(cupy.asnumpy(hg), h, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(cupy.asnumpy(b.data), w, rtol=1e-6, atol=1e-7)


DUMMY_LOSS_NET = """
layer { name: "x" type: "DummyData" top: "x" top: "label" dummy_data_param { shape { dim: 4 dim: 3 } shape { dim: 4 }
        data_filler { type: "gaussian" std: 1 } data_filler { type: "constant" value: 2 } } }
layer { name: "fc" type: "InnerProduct" bottom: "x" top: "fc"
        inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc" bottom: "label" top: "loss" }
"""


@pytest.mark.parametrize("kind", ["Nesterov", "AdaGrad", "RMSProp", "AdaDelta", "Adam"])
def test_other_solver_types_step_as_on_numpy(kind):
    """Solver types other than SGD run as elementwise CuPy (the fused kernel is SGD's):
    three steps give the weights NumPy gives."""
    from vggcaffe.solver import SGDSolver
    weights = {}
    for gpu in (False, True):
        (backend.set_mode_gpu if gpu else backend.set_mode_cpu)()
        param = caffe_pb2.SolverParameter(net_param=text_format.Parse(DUMMY_LOSS_NET, caffe_pb2.NetParameter()),
                                          type=kind, base_lr=0.1, lr_policy="fixed", weight_decay=5e-4,
                                          momentum=0 if kind in ("AdaGrad", "RMSProp") else 0.9, max_iter=3,
                                          display=0, random_seed=3, snapshot_after_train=False)
        solver = SGDSolver(param)
        solver.step(3)
        weights[gpu] = [backend.to_numpy(b.data) for b in solver.net.learnable_params]
    for g, c in zip(weights[True], weights[False]):
        assert rel_err(g, c) <= 1e-5


# --- convolution (cuDNN) -----------------------------------------------------------
CONV = {
    "3x3_pad1": ("num_output: 8 kernel_size: 3 pad: 1", (2, 5, 9, 9)),
    "3x3_stride2": ("num_output: 6 kernel_size: 3 stride: 2", (2, 4, 11, 11)),
    "1x1": ("num_output: 6 kernel_size: 1", (2, 5, 7, 7)),
    "dilation2": ("num_output: 4 kernel_size: 3 pad: 2 dilation: 2", (2, 3, 9, 9)),
    "no_bias": ("num_output: 5 kernel_size: 3 pad: 1 bias_term: false", (2, 3, 6, 6)),
    "3x1": ("num_output: 4 kernel_h: 3 kernel_w: 1 pad_h: 1 pad_w: 0", (2, 3, 6, 5)),
    "small_c": ("num_output: 16 kernel_size: 3 pad: 1", (2, 3, 10, 9)),            # conv1_1-like
    "small_c_stride2": ("num_output: 8 kernel_size: 3 stride: 2 pad: 1 bias_term: false", (2, 3, 9, 8)),
}
FILLERS = "weight_filler { type: 'gaussian' std: 0.2 } bias_filler { type: 'gaussian' std: 0.2 }"


def conv_text(name):
    return f"name: 'c' type: 'Convolution' convolution_param {{ {CONV[name][0]} {FILLERS} }}"


def run_conv(name, precision, fused_relu, channels_last, bf16_blobs=False, layout="nhwc", small_c_direct=False):
    """The cuDNN layer (optionally with the ReLU folded in, NHWC blobs, bfloat16
    bottom and top as prepare_net makes them in bf16; in strict fp32, cuDNN in
    either layout) against NumPy convolution followed by NumPy ReLU. `small_c_direct`:
    forward and weight gradient ran the direct small-C kernels, not cuDNN."""
    from vggcaffe.gpu import cudnn_conv, set_fp32_layout
    from vggcaffe.gpu.conv import CHANNEL_ALIGN, CudnnConv
    from vggcaffe.gpu.kernels import BF16, assign
    set_fp32_layout(layout)
    text, shape = conv_text(name), CONV[name][1]
    x, dy = randn(*shape, seed=1), None
    if bf16_blobs:
        x = round_bf16(x)
    cpu, cb, ct = build(text, [x], False)
    gpu, gb, gt = build(text, [x], True, channels_last_bottom=channels_last)
    from vggcaffe.gpu import set_precision
    set_precision(precision)
    assert isinstance(gpu._gpu, CudnnConv)
    gpu.fused_relu, gpu.channels_last = fused_relu, channels_last
    if bf16_blobs:
        to_bf16_blob(gb[0], x)
        gpu.top_dtype = BF16
    gpu.reshape(gb, gt)
    assert gt[0].data.dtype == (BF16 if bf16_blobs else np.float32)
    cpu.forward(cb, ct)
    if fused_relu:
        np.maximum(ct[0].data, 0, out=ct[0].data)
    gpu.forward(gb, gt)
    bound = BOUND[precision]
    assert rel_err(gt[0].data, ct[0].data) <= bound, "forward"
    dy = randn(*ct[0].shape, seed=2)
    if bf16_blobs:
        dy = round_bf16(dy)
        ct[0].data[...] = round_bf16(ct[0].data)
    assign(gt[0].diff, dy)
    assign(gt[0].data, ct[0].data)               # the ReLU mask from the same Y on both sides
    ct[0].diff[...] = dy * (ct[0].data > 0) if fused_relu else dy
    cpu.backward(ct, [True], cb)
    gpu.backward(gt, [True], gb)
    assert rel_err(gb[0].diff, cb[0].diff) <= bound, "dX"
    for j, (c, g) in enumerate(zip(cpu.blobs, gpu.blobs)):
        assert rel_err(g.diff, c.diff) <= bound, f"param[{j}] diff"
    want = layout if precision == "fp32" else "nhwc"
    assert gpu._gpu.layout.name == want
    n, c, h, w = cb[0].shape
    align = CHANNEL_ALIGN.get(precision, 1)                 # the zero-padded input cuDNN sees in tf32/bf16
    shapes = {(n, -(-c // align) * align, h, w), tuple(ct[0].shape)}   # fprop's key holds X's shape only
    kinds = {(k[0], k[-2]) for k in cudnn_conv._graphs if shapes & set(k) and k[-1] == precision}
    passes = ["dgrad"] if small_c_direct else ["fprop", "dgrad", "wgrad"]
    assert {(kind, want) for kind in passes} <= kinds, kinds


@pytest.mark.parametrize("name", list(CONV))
@pytest.mark.parametrize("fused_relu,channels_last", [(False, False), (True, True), (True, False), (False, True)])
@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
def test_conv_fp32(name, fused_relu, channels_last, layout):
    run_conv(name, "fp32", fused_relu, channels_last, layout=layout)


def test_fp32_layout_choice():
    """set_fp32_layout picks strict fp32's convolution layout only; other precisions stay
    channels-last; an unknown name is refused."""
    from vggcaffe.errors import VggcaffeError
    from vggcaffe.gpu import conv_layout, set_fp32_layout
    set_fp32_layout("nchw")
    assert (conv_layout("fp32"), conv_layout("tf32"), conv_layout("bf16")) == ("nchw", "nhwc", "nhwc")
    set_fp32_layout("NHWC")
    assert conv_layout("fp32") == "nhwc"
    with pytest.raises(VggcaffeError, match="unknown layout 'nhcw'"):
        set_fp32_layout("nhcw")


@pytest.fixture(scope="module")
def vgg_shape_reference():
    """float64 NumPy forward and backward of 3x3 convolutions at two of VGG-16's shapes
    (conv3_2, conv4_2) at batch 32: {C: (param, x, dy, y, dx, dW)}."""
    out = {}
    for c, h in ((256, 56), (512, 28)):
        backend.set_mode_cpu()
        param = text_format.Parse(f"name: 'c' type: 'Convolution' convolution_param {{ num_output: {c} kernel_size: 3 "
                                  f"pad: 1 weight_filler {{ type: 'msra' }} }}", caffe_pb2.LayerParameter())
        layer = LAYER_TYPES["Convolution"](param, phase="TRAIN", dtype=np.float64, rng=np.random.default_rng(7))
        x, dy = randn(32, c, h, h, seed=1).astype(np.float64), randn(32, c, h, h, seed=2).astype(np.float64)
        bottom, top = Blob(x.shape, dtype=np.float64, xp=np), Blob((), dtype=np.float64, xp=np)
        bottom.data[...] = x
        layer.setup([bottom], [top])
        weights = np.array(layer.blobs[0].data, dtype=np.float32)
        layer.blobs[0].data[...] = weights                 # the float32 weights, exactly
        layer.forward([bottom], [top])
        top.diff[...] = dy
        layer.backward([top], [True], [bottom])
        out[c] = (param, x, dy, top.data.copy(), bottom.diff.copy(), layer.blobs[0].diff.copy(), weights)
    return out


@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
@pytest.mark.parametrize("c", [256, 512])
def test_strict_fp32_at_vgg_shapes(vgg_shape_reference, layout, c):
    """Strict fp32 at VGG-16's own layer shapes (batch 32, so cuDNN picks among the plans a
    training run gets, not the small tests'): forward, dX and dW within 1e-5 of float64,
    in each layout (a TF32 engine would be ~1e-3 off)."""
    from vggcaffe.gpu import set_fp32_layout, set_precision
    param, x, dy, y, dx, dw, weights = vgg_shape_reference[c]
    backend.set_mode_gpu()
    set_precision("fp32")
    set_fp32_layout(layout)
    layer = LAYER_TYPES["Convolution"](param, phase="TRAIN", dtype=np.float32, rng=np.random.default_rng(7))
    bottom, top = Blob(x.shape, dtype=np.float32), Blob((), dtype=np.float32)
    bottom.data[...] = cupy.asarray(x, np.float32)
    layer.setup([bottom], [top])
    layer.blobs[0].data[...] = cupy.asarray(weights)
    layer.forward([bottom], [top])
    assert rel_err(top.data, y) <= 1e-5, "forward"
    top.diff[...] = cupy.asarray(dy, np.float32)
    layer.backward([top], [True], [bottom])
    assert rel_err(bottom.diff, dx) <= 1e-5, "dX"
    assert rel_err(layer.blobs[0].diff, dw) <= 1e-5, "dW"


def test_conv_plans_are_autotuned():
    """With autotuning on, every convolution graph the layer ran timed its candidate plans
    and runs the fastest."""
    from vggcaffe.gpu import cudnn_conv
    if not cudnn_conv.AUTOTUNE:
        pytest.skip("VGGCAFFE_CUDNN_AUTOTUNE=0")
    from vggcaffe.gpu.conv import CHANNEL_ALIGN
    run_conv("3x3_pad1", "tf32", True, True)
    n, c, h, w = CONV["3x3_pad1"][1]
    align = CHANNEL_ALIGN["tf32"]
    shape = (n, -(-c // align) * align, h, w)         # the zero-padded input cuDNN sees
    tuned = [(k[0], p) for k, p in cudnn_conv._graphs.items()
             if k[-1] == "tf32" and k[0] != "bias_grad" and shape in k]
    assert {kind for kind, _ in tuned} >= {"fprop", "dgrad", "wgrad"}
    for kind, plan in tuned:
        assert plan.timings and plan.index == min(plan.timings, key=plan.timings.get), kind


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
@pytest.mark.parametrize("name", ["3x3_pad1", "3x3_stride2", "1x1"])
@pytest.mark.parametrize("fused_relu,channels_last", [(False, False), (True, True)])
def test_conv_reduced_precision(precision, name, fused_relu, channels_last):
    run_conv(name, precision, fused_relu, channels_last)


@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16"])
@pytest.mark.parametrize("name", ["small_c", "small_c_stride2"])
@pytest.mark.parametrize("fused_relu", [False, True])
def test_conv_small_c_direct_kernels(precision, name, fused_relu, monkeypatch):
    """The direct kernels for few input channels (conv1_1), forward and weight gradient,
    compute what NumPy does, in each precision, with a channels-last top (bfloat16 in bf16)."""
    from vggcaffe.gpu import conv
    calls = []
    for method in ("_fprop_small_c", "_wgrad_small_c"):
        def spy(self, *args, _run=getattr(conv.CudnnConv, method), _name=method):
            calls.append(_name)
            return _run(self, *args)
        monkeypatch.setattr(conv.CudnnConv, method, spy)
    monkeypatch.setattr(conv, "DIRECT", "always")
    run_conv(name, precision, fused_relu, True, bf16_blobs=precision == "bf16", small_c_direct=True)
    assert set(calls) == {"_fprop_small_c", "_wgrad_small_c"}


@pytest.mark.parametrize("name", ["3x3_pad1", "3x3_stride2", "1x1", "no_bias"])
@pytest.mark.parametrize("fused_relu", [False, True])
def test_conv_bf16_blobs(name, fused_relu):
    """bf16 with bfloat16 channels-last bottom and top: cuDNN reads and writes them directly."""
    run_conv(name, "bf16", fused_relu, True, bf16_blobs=True)


@pytest.mark.parametrize("refuse,precision,bf16_blobs", [
    ("fused", "fp32", False), ("fused", "bf16", True), ("bf16_out", "bf16", False), ("fused", "fp32-nchw", False)])
def test_conv_fallback_configurations(monkeypatch, refuse, precision, bf16_blobs):
    """Where cuDNN refuses a graph the layer falls back to the next configuration: "fused",
    no bias or ReLU inside the graph (a plain convolution, then the bias_relu kernel on the
    float32 or bfloat16 top); "bf16_out", no bfloat16 outputs (float32 ones, stored after).
    Refusals are simulated by failing those graphs' builds."""
    from vggcaffe.gpu import conv
    choose = conv._choose

    def refusing(key, configs, build):
        def build_or_refuse(config):
            fused = isinstance(config, tuple) and (config[0] or config[1])
            bf16_out = config[2] if isinstance(config, tuple) else config
            if (fused if refuse == "fused" else bf16_out):
                raise RuntimeError("refused by the test")
            return build(config)
        return choose(key, configs, build_or_refuse)
    monkeypatch.setattr(conv, "_choose", refusing)
    monkeypatch.setattr(conv, "_choices", {})                  # no configuration remembered from other tests
    precision, _, layout = precision.partition("-")
    run_conv("3x3_pad1", precision, True, True, bf16_blobs=bf16_blobs, layout=layout or "nhwc")


# --- the other layers ----------------------------------------------------------------
@pytest.mark.parametrize("pool,channels_last", [
    ("pool: MAX kernel_size: 2 stride: 2", False), ("pool: MAX kernel_size: 2 stride: 2", True),
    ("pool: MAX kernel_size: 3 stride: 2 pad: 1", False), ("pool: AVE kernel_size: 3 stride: 1 pad: 1", True)])
def test_pooling(pool, channels_last):
    compare_layer(f"name: 'p' type: 'Pooling' pooling_param {{ {pool} }}", [randn(2, 3, 8, 8)],
                  channels_last_bottom=channels_last)


@pytest.mark.parametrize("pool,shape", [("kernel_size: 2 stride: 2", (2, 5, 8, 8)),
                                        ("kernel_size: 3 stride: 2 pad: 1", (2, 4, 9, 7)),
                                        ("kernel_size: 3 stride: 2", (2, 3, 8, 8)),
                                        ("kernel_size: 2 stride: 2", (2, 16, 9, 7)),
                                        ("kernel_size: 3 stride: 2 pad: 1", (2, 24, 9, 7))])
@pytest.mark.parametrize("channels_last", [False, True])
def test_max_pool_kernel(pool, shape, channels_last):
    """The one-pass MAX pooling that prepare_net puts in place, on both layouts in and out
    (channels-last with C a multiple of 8: the 8-channel vector kernels, windows clipped
    at the edges)."""
    from vggcaffe.gpu.pooling import MaxPoolGPU

    def swap(layer, bottom, top):
        fast = MaxPoolGPU(layer)
        fast.channels_last = channels_last
        fast.reshape(bottom, top)
        return fast
    compare_layer(f"name: 'p' type: 'Pooling' pooling_param {{ pool: MAX {pool} }}", [randn(*shape)],
                  channels_last_bottom=channels_last, setup_gpu=swap)


@pytest.mark.parametrize("top_dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("pool", ["kernel_size: 2 stride: 2", "kernel_size: 3 stride: 2 pad: 1"])
def test_max_pool_bf16_and_relu_mask(pool, top_dtype):
    """The MAX pool kernel on a bfloat16 channels-last bottom (a folded ReLU's output),
    top in bfloat16 or float32, doing the ReLU's backward (relu_mask): against NumPy
    pooling of the same rounded values with dY masked by Y > 0."""
    from vggcaffe.gpu.kernels import BF16, assign
    from vggcaffe.gpu.pooling import MaxPoolGPU
    text = f"name: 'p' type: 'Pooling' pooling_param {{ pool: MAX {pool} }}"
    x = round_bf16(np.maximum(randn(2, 16, 9, 7, seed=8), 0))
    cpu, cb, ct = build(text, [x], False)
    gpu, gb, gt = build(text, [x], True, channels_last_bottom=True)
    to_bf16_blob(gb[0], x)
    fast = MaxPoolGPU(gpu)
    fast.channels_last, fast.relu_mask = True, True
    fast.top_dtype = np.dtype(BF16 if top_dtype == "bf16" else np.float32)
    fast.reshape(gb, gt)
    assert gt[0].data.dtype == fast.top_dtype
    cpu.forward(cb, ct)
    fast.forward(gb, gt)
    assert rel_err(gt[0].data, ct[0].data) == 0, "forward"
    dy = round_bf16(randn(*ct[0].shape, seed=9))
    assign(gt[0].diff, dy)
    ct[0].diff[...] = dy * (ct[0].data > 0)
    cpu.backward(ct, [True], cb)
    fast.backward(gt, [True], gb)
    assert rel_err(gb[0].diff, cb[0].diff) <= 1e-2, "dX"


@pytest.mark.parametrize("channels_last", [False, True])
def test_lrn(channels_last):
    compare_layer("name: 'n' type: 'LRN' lrn_param { local_size: 5 alpha: 0.0001 beta: 0.75 k: 2 }",
                  [randn(2, 7, 5, 5)], channels_last_bottom=channels_last)


def test_relu_dropout_softmax_flatten():
    x = randn(4, 6, 3, 3)
    compare_layer("name: 'r' type: 'ReLU'", [x])
    compare_layer("name: 'r' type: 'ReLU' relu_param { negative_slope: 0.1 }", [x])
    compare_layer("name: 'd' type: 'Dropout' dropout_param { dropout_ratio: 0.5 }", [x], phase="TEST")
    compare_layer("name: 's' type: 'Softmax'", [x])
    compare_layer("name: 'f' type: 'Flatten'", [x])


def test_dropout_masks_drawn_on_device():
    """TRAIN masks come from a device generator seeded from the layer's rng: values 0 or
    1/(1-ratio) at the right rate, backward through the same mask, the same seed gives
    the same masks, and each forward draws a new one."""
    text = "name: 'd' type: 'Dropout' dropout_param { dropout_ratio: 0.3 }"
    x = randn(64, 4096)
    layer, bottom, top = build(text, [x], True)
    again, bottom2, top2 = build(text, [x], True)
    layer.forward(bottom, top)
    again.forward(bottom2, top2)
    mask = cupy.asnumpy(layer.mask)
    np.testing.assert_array_equal(mask, cupy.asnumpy(again.mask))
    assert set(np.unique(mask)) <= {0.0, np.float32(layer.scale)}
    assert abs((mask > 0).mean() - 0.7) < 0.01
    np.testing.assert_array_equal(cupy.asnumpy(top[0].data), x * mask)
    dy = randn(64, 4096, seed=5)
    top[0].diff[...] = cupy.asarray(dy)
    layer.backward(top, [True], bottom)
    np.testing.assert_array_equal(cupy.asnumpy(bottom[0].diff), dy * mask)
    layer.forward(bottom, top)
    assert (cupy.asnumpy(layer.mask) != mask).mean() > 0.3


@pytest.mark.parametrize("precision,transpose", [("fp32", False), ("fp32", True), ("tf32", False)])
def test_inner_product(precision, transpose):
    text = (f"name: 'fc' type: 'InnerProduct' inner_product_param {{ num_output: 9 transpose: {str(transpose).lower()} "
            "weight_filler { type: 'gaussian' std: 0.1 } bias_filler { type: 'gaussian' std: 0.1 } }")
    compare_layer(text, [randn(4, 6, 3, 3)], bound=BOUND[precision], precision=precision)


def test_losses_and_accuracy():
    scores, labels = randn(8, 10), np.arange(8, dtype=np.float32) % 10
    compare_layer("name: 'l' type: 'SoftmaxWithLoss'", [scores, labels], backward_bottoms=[True, False])
    compare_layer("name: 'e' type: 'EuclideanLoss'", [scores, randn(8, 10, seed=4)])
    compare_layer("name: 'a' type: 'Accuracy' accuracy_param { top_k: 3 }", [scores, labels],
                  backward_bottoms=[False, False])
    compare_layer("name: 's' type: 'ClassSelect' class_select_param { group_size: 2 }",
                  [scores, np.array([4, 0, 1, 3, 2, 4, 0, 1], np.float32)], backward_bottoms=[True, False])


def test_box_regression_trains_as_on_numpy():
    """A per-class box regressor (BoxData Python layer, ClassSelect, EuclideanLoss) made by
    localisation_net from the tiny 32 px net A, without dropout (its masks are drawn
    differently on the device): five GPU solver steps give the NumPy losses."""
    from vggcaffe.localize import localisation_net
    from vggcaffe.solver import SGDSolver
    root = Path(__file__).resolve().parents[2] / "shared" / "data" / "boxes"
    net = localisation_net(Path(__file__).resolve().parents[1] / "models" / "small" / "A_train_val.prototxt",
                           root, batch_size=4, test_batch_size=4)
    kept = [lp for lp in net.layer if lp.type != "Dropout"]
    del net.layer[:]
    net.layer.extend(kept)
    losses = {}
    for gpu in (False, True):
        (backend.set_mode_gpu if gpu else backend.set_mode_cpu)()
        param = caffe_pb2.SolverParameter(net_param=net, base_lr=0.01, lr_policy="fixed", momentum=0.9,
                                          max_iter=5, display=0, random_seed=3, test_iter=[1], test_interval=100)
        solver = SGDSolver(param)
        losses[gpu] = []
        for _ in range(5):
            solver.step(1)
            losses[gpu].append(solver.losses[-1])
    assert rel_err(np.array(losses[True]), np.array(losses[False])) <= 1e-4


TINY_LOSS_NET = """
layer { name: "x" type: "Input" top: "x" top: "label" input_param { shape { dim: 4 dim: 3 } shape { dim: 4 } } }
layer { name: "fc" type: "InnerProduct" bottom: "x" top: "fc"
        inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc" bottom: "label" top: "loss" }
"""


def test_a_bad_label_is_raised_once_the_loss_is_read():
    """On the GPU the label-range check is a device flag read with the loss, after the pass
    is queued (no host wait inside forward); the error is the one NumPy raises at once."""
    from vggcaffe.errors import VggcaffeError
    from vggcaffe.net import Net
    backend.set_mode_gpu()
    net = Net(text_format.Parse(TINY_LOSS_NET, caffe_pb2.NetParameter()), phase="TRAIN", seed=1)
    net.blobs["x"].data[...] = cupy.asarray(randn(4, 3))
    net.blobs["label"].data[...] = cupy.asarray(np.array([0, 4, 1, 2], np.float32))
    assert np.isfinite(net.forward_backward())
    net.blobs["label"].data[...] = cupy.asarray(np.array([0, 5, 1, 2], np.float32))
    net.layers[-1].forward(net._bottoms[-1], net._tops[-1])      # the layer alone raises nothing
    with pytest.raises(VggcaffeError, match=r"layer 'loss' \(SoftmaxWithLoss\): a label is outside \[0, 5\)"):
        net.forward_backward()
    with pytest.raises(VggcaffeError, match="outside"):
        net.forward_loss()
    net.blobs["label"].data[...] = cupy.asarray(np.array([0, 4, 1, 2], np.float32))
    assert np.isfinite(net.forward_loss())


@pytest.mark.skipif(not hasattr(cupy, "host_reads"), reason="CuPy counts no host reads; the stand-in does")
def test_a_training_step_reads_the_device_once():
    """No host round-trip in forward, backward or the update: a GPU solver step reads the
    device once, the loss, after backward is queued."""
    from vggcaffe.solver import SGDSolver
    backend.set_mode_gpu()
    param = caffe_pb2.SolverParameter(base_lr=0.1, lr_policy="fixed", momentum=0.9, weight_decay=5e-4,
                                      max_iter=100, display=0, random_seed=3)
    text_format.Parse(TINY_LOSS_NET, param.net_param)
    solver = SGDSolver(param)
    solver.net.blobs["x"].data[...] = cupy.asarray(randn(4, 3))
    solver.net.blobs["label"].data[...] = cupy.asarray(np.array([0, 4, 1, 2], np.float32))
    solver.step(2)
    before = cupy.host_reads()
    solver.step(3)
    assert cupy.host_reads() - before == 3


def test_data_layer_feed_uploads_the_host_batches():
    """NpzData on the GPU (its prefetch thread uploading through pinned memory on a copy
    stream) gives the batches it gives on NumPy; nothing waits for the device between
    forwards (the tops' copies come to the host at the end) while its 5 slots go round."""
    npz = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenette_32.npz"
    if not npz.exists():
        pytest.skip(f"real test data not found at {npz}")
    text = (f'name: "data" type: "NpzData" top: "data" top: "label" npz_data_param {{ source: "{npz}" '
            f'batch_size: 64 shuffle: true }} transform_param {{ crop_size: 28 mirror: true mean_value: 120 }}')
    batches = []
    for gpu, prefetch in [(False, 0), (True, 3)]:
        layer, _, top = build(text, [], gpu, n_tops=2)
        layer.prefetch, out = prefetch, []
        for _ in range(13):
            layer.forward([], top)
            out.append((top[0].data.copy(), top[1].data.copy()))
        assert (layer._stager is not None) == gpu
        layer.close()
        batches.append([(cupy.asnumpy(d), cupy.asnumpy(lab)) for d, lab in out])
    for (d, lab), (gd, glab) in zip(*batches):
        np.testing.assert_array_equal(gd, d)
        np.testing.assert_array_equal(glab, lab)


# --- a whole VGG-16 ------------------------------------------------------------------
def record_cpu(net):
    """Per layer, on NumPy: bottoms before forward (x), tops after (y), top diffs
    before backward (dy), bottom and param diffs after (dx, dw); and the loss."""
    net.clear_param_diffs()
    rec, loss = [], 0.0
    for i in range(len(net.layers)):
        x = [b.data.copy() for b in net._bottoms[i]]
        loss += net._forward_layer(i)
        rec.append(dict(x=x, y=[t.data.copy() for t in net._tops[i]]))
    for i in reversed(range(len(net.layers))):
        rec[i]["dy"] = [t.diff.copy() for t in net._tops[i]]
        if net._need_backward[i]:
            net.layers[i].backward(net._tops[i], net._bottom_need[i], net._bottoms[i])
        rec[i]["dx"] = [b.diff.copy() for b in net._bottoms[i]]
        rec[i]["dw"] = [b.diff.copy() for b in net.layers[i].blobs]
    return rec, loss


@pytest.fixture(scope="module")
def vgg16_cpu():
    """VGG-16 (D) at batch 2, synthetic inputs, MSRA weights, dropout ratio 0, recorded layer by layer on NumPy."""
    from vggcaffe.net import Net
    from vggcaffe.timing import fill_inputs, synthetic_net
    param = synthetic_net(str(Path(__file__).parent.parent / "models" / "D_train_val.prototxt"), batch=2)
    for lp in param.layer:
        if lp.type in ("Convolution", "InnerProduct"):
            filler = (lp.convolution_param if lp.type == "Convolution" else lp.inner_product_param).weight_filler
            filler.type = "msra"
        if lp.type == "Dropout":    # GPU masks are drawn on the device (own test); keep every unit here
            lp.dropout_param.dropout_ratio = 0.0
    backend.set_mode_cpu()
    net = Net(param, phase="TRAIN", seed=11)
    fill_inputs(net)
    rec, loss = record_cpu(net)
    return param, rec, loss, [b.data.copy() for b in net.learnable_params]


# Precisions as run on VGG-16: strict fp32 in each convolution layout, tf32, bf16.
VGG_PRECISIONS = ["fp32", "fp32-nchw", "tf32", "bf16"]


def _gpu_vgg16(param, params, precision, share=True):
    """VGG-16 prepared for the GPU under `precision` (one of VGG_PRECISIONS), with `params`."""
    from vggcaffe.blob import is_channels_last
    from vggcaffe.gpu import prepare_net, set_fp32_layout, set_precision
    from vggcaffe.net import Net
    backend.set_mode_gpu()
    precision, _, layout = precision.partition("-")
    set_precision(precision)
    set_fp32_layout(layout or "nhwc")
    net = prepare_net(Net(param, phase="TRAIN", seed=11), share=share)
    assert net.layer_dict["conv1_1"].fused_relu
    assert net.layer_dict["conv1_1"].channels_last == (layout != "nchw")
    if layout == "nchw":
        assert not any(is_channels_last(b.data) and not b.data.flags.c_contiguous for b in net.blobs.values())
    for blob, data in zip(net.learnable_params, params):
        blob.data[...] = cupy.asarray(data)
    return net


@pytest.mark.parametrize("precision", VGG_PRECISIONS)
def test_vgg16_forward_backward(vgg16_cpu, precision):
    """Every layer of VGG-16 (the ReLUs folded into the convolutions, the MAX pools doing
    the ReLU backward before them, channels-last; in bf16 the activations between
    convolutions and pools held as bfloat16), forward and backward, fed the NumPy run's
    inputs and top gradients layer by layer (so a ReLU or max-pool decision flipped by
    rounding upstream cannot reroute a whole gradient), and the end-to-end loss and scores."""
    from vggcaffe.gpu import FusedReLU
    from vggcaffe.gpu.kernels import BF16, assign
    param, rec, loss, params = vgg16_cpu
    net = _gpu_vgg16(param, params, precision)
    bf16_blobs = [name for name, blob in net.blobs.items() if blob.data.dtype == BF16]
    if precision == "bf16":
        assert {"conv1_1", "conv1_2", "pool1", "conv5_3"} <= set(bf16_blobs) and "pool5" not in bf16_blobs
    else:
        assert not bf16_blobs
    assert net.layer_dict["conv1_2"].relu_grad_in_pool and net.layer_dict["pool1"].relu_mask
    assert not net.layer_dict["conv1_1"].relu_grad_in_pool
    errors = {}
    for i, layer in enumerate(net.layers):
        if isinstance(layer, FusedReLU):
            continue
        out = rec[i + 1] if getattr(layer, "fused_relu", False) else rec[i]
        if layer.type == "Input":
            for t, y in zip(net._tops[i], out["y"]):
                assign(t.data, y)
            continue
        for b, x in zip(net._bottoms[i], rec[i]["x"]):
            assign(b.data, x)
        net._forward_layer(i)
        for k, (t, y) in enumerate(zip(net._tops[i], out["y"])):
            errors[f"{layer.name} top[{k}]"] = rel_err(t.data, y)
        if not net._need_backward[i]:
            continue
        # A convolution whose ReLU's backward the pool did is fed the masked dY.
        dys = rec[i]["dy"] if getattr(layer, "relu_grad_in_pool", False) else out["dy"]
        for t, y, dy in zip(net._tops[i], out["y"], dys):
            assign(t.data, y)
            assign(t.diff, dy)
        for blob in layer.blobs:
            blob.diff[...] = 0
        layer.backward(net._tops[i], net._bottom_need[i], net._bottoms[i])
        # A pool with relu_mask also did the folded ReLU's backward (the layer before it).
        dxs = rec[i - 1]["dx"] if getattr(layer, "relu_mask", False) else rec[i]["dx"]
        if layer.type == "Pooling" and net._bottoms[i][0].data.dtype == BF16:
            # Its maxima were taken over bfloat16-rounded inputs, so near-ties can go to
            # another element than in float32: the reference pools the rounded values.
            top_bf16 = net._tops[i][0].data.dtype == BF16
            dxs = [pool_reference(layer, rec[i]["x"][0], rec[i]["dy"][0], top_bf16)]
        for k, (b, dx) in enumerate(zip(net._bottoms[i], dxs)):
            if net._bottom_need[i][k]:
                errors[f"{layer.name} bottom[{k}] diff"] = rel_err(b.diff, dx)
        for j, (blob, dw) in enumerate(zip(layer.blobs, rec[i]["dw"])):
            errors[f"{layer.name} param[{j}] diff"] = rel_err(blob.diff, dw)
    net = _gpu_vgg16(param, params, precision)
    for name, x in zip(net.inputs, rec[0]["y"]):
        assign(net.blobs[name].data, x)
    errors["loss (end to end)"] = abs(net.forward_loss() - loss) / abs(loss)
    errors["fc8 (end to end)"] = rel_err(net.blobs["fc8"].data, rec[-1]["x"][0])
    print(f"VGG-16 {precision}: worst relative errors", sorted(errors.items(), key=lambda e: -e[1])[:6])
    worst = max(errors, key=errors.get)
    assert errors[worst] <= BOUND[precision.split("-")[0]], f"{worst}: {errors[worst]:.3g}"


def pool_reference(layer, x, dy, top_bf16):
    """NumPy MAX pooling of bfloat16-rounded x, backward of dy (rounded when the top is
    bfloat16) masked by Y > 0 where the pool does a folded ReLU's backward; returns dX."""
    from vggcaffe.layers import LAYER_TYPES
    ref = LAYER_TYPES["Pooling"](layer.param, phase="TRAIN", dtype=np.float32, rng=np.random.default_rng(0))
    bottom, top = Blob(x.shape, xp=np), Blob((), xp=np)
    bottom.data[...] = round_bf16(x)
    ref.setup([bottom], [top])
    ref.forward([bottom], [top])
    dy = round_bf16(dy) if top_bf16 else dy
    top.diff[...] = dy * (top.data > 0) if layer.relu_mask else dy
    ref.backward([top], [True], [bottom])
    return bottom.diff


@pytest.mark.parametrize("precision", ["fp32", "fp32-nchw", "bf16"])
def test_vgg16_step_with_shared_diffs(vgg16_cpu, precision):
    """net.forward_backward on a prepared VGG-16 whose activation diffs share memory gives
    the parameter gradients of the same net with a diff array per blob, and far less
    diff memory."""
    from vggcaffe.gpu.kernels import assign
    param, rec, loss, params = vgg16_cpu
    grads, losses = [], []
    for share in (True, False):
        net = _gpu_vgg16(param, params, precision, share=share)
        for name, x in zip(net.inputs, rec[0]["y"]):
            assign(net.blobs[name].data, x)
        net.clear_param_diffs()
        losses.append(net.forward_backward())
        grads.append([cupy.asnumpy(b.diff) for b in net.learnable_params])
        if share:
            activations = sum(b.data.nbytes for b in net.blobs.values())
            assert 0 < net.shared_diff_bytes < activations / 2
    assert abs(losses[0] - losses[1]) <= 1e-6 * abs(losses[1])
    worst = max(rel_err(cupy.asarray(a), b) for a, b in zip(*grads))
    assert worst <= (1e-2 if precision == "bf16" else 1e-5), f"worst param gradient difference {worst:.3g}"
    assert abs(losses[0] - loss) / abs(loss) <= BOUND[precision.split("-")[0]]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_vgg16_test_net_with_shared_data(vgg16_cpu, precision):
    """A prepared TEST-phase VGG-16 whose activations share memory (memory.share_data, as
    the evaluation nets) scores like the same net with an array per blob, holding less."""
    from vggcaffe.gpu import prepare_net, set_precision
    from vggcaffe.memory import share_data
    from vggcaffe.net import Net
    from vggcaffe.timing import fill_inputs
    param = vgg16_cpu[0]
    backend.set_mode_gpu()
    set_precision(precision)
    scores, nets = [], []
    for share in (False, True):
        net = prepare_net(Net(param, phase="TEST", seed=11))       # same seed: same weights
        if share:
            share_data(net, keep=["fc8"])
        fill_inputs(net, seed=4)
        net.forward_loss()
        scores.append(net.blobs["fc8"].data.copy())
        nets.append(net)
    assert rel_err(scores[1], cupy.asnumpy(scores[0])) <= 1e-6
    activations = sum(b.data.nbytes for name, b in nets[0].blobs.items() if name not in nets[0].inputs)
    assert 0 < nets[1].data_slots.nbytes < activations / 2


# --- the command line ------------------------------------------------------------------
def _train_log(solver, gpu):
    """The log lines of `vggcaffe train` (prefix stripped) and their shapes (numbers masked)."""
    import re
    import subprocess
    import sys
    root = Path(__file__).resolve().parent.parent
    cli = "tests.fake_gpu" if os.environ.get("VGGCAFFE_FAKE_GPU") == "1" else "vggcaffe.cli"   # see tests/fake_gpu.py
    cmd = [sys.executable, "-m", cli, "train", "--solver", str(solver)] + (["--gpu", "0"] if gpu else [])
    result = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line.split("] ", 1)[1] for line in result.stderr.splitlines() + result.stdout.splitlines()
             if "] " in line and "solver.py]" in line]
    return lines, [re.sub(r"[-+]?\d[\d.e+-]*", "#", line) for line in lines]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cli_train_on_gpu_logs_what_the_cpu_logs(tmp_path, precision):
    """`vggcaffe train --gpu 0` on the small A net (20 iterations, fixed lr, tests at 0, 10
    and 20): the same log lines as on the CPU, numbers aside, and finite losses."""
    root = Path(__file__).resolve().parent.parent
    text = (root / "models" / "small" / "A_solver.prototxt").read_text()
    for field, value in [("max_iter", "20"), ("display", "10"), ("test_interval", "10"), ("test_iter", "2"),
                         ("lr_policy", '"fixed"'), ("snapshot_prefix", f'"{tmp_path / "A"}"')]:
        text = "\n".join(f"{field}: {value}" if line.startswith(f"{field}:") else line for line in text.splitlines())
    text = text.replace('net: "models/small/A_train_val.prototxt"',
                        f'net: "{root / "models" / "small" / "A_train_val.prototxt"}"')
    solver = tmp_path / "A_solver.prototxt"
    solver.write_text(text + f'\nprecision: "{precision}"\n')
    (cpu_lines, cpu_shapes), (gpu_lines, gpu_shapes) = _train_log(solver, False), _train_log(solver, True)
    assert gpu_shapes == cpu_shapes, "\n".join(f"{a} | {b}" for a, b in zip(cpu_lines, gpu_lines) if a != b)
    losses = [float(line.rsplit("=", 1)[1]) for line in gpu_lines if line.startswith("Iteration") and "loss =" in line]
    assert len(losses) >= 2 and all(np.isfinite(losses))
