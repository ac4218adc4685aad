"""Convolution through cuDNN graphs (NVIDIA's cudnn frontend) on CuPy blobs.

Shapes stay Caffe's logical NCHW; cuDNN runs channels-last (NHWC memory,
filters K·kh·kw·C), as it is fastest on tensor cores, or, in strict fp32 when
asked (`precision.conv_layout`), NCHW, where other fp32 engines (FFT) apply;
each plan function takes the layout, and graphs are cached per layout. A top
blob the net pass (`vggcaffe.gpu.prepare_net`) marks `channels_last` holds
NCHW-shaped views with NHWC strides, so cuDNN reads and writes it in place;
other blobs are copied (NCHW <-> NHWC through the tiled transpose kernels).

    forward    Y = relu?(conv(X, W) + b)           one fused graph (fprop + bias + ReLU)
    backward   dZ = dY * (Y > 0) if the ReLU was fused, cast to the compute type
               db += sum_{N,H,W} dZ               reduction graph
               dW += wgrad(X, dZ)                 wgrad graph (float32 out, K·kh·kw·C or K·C·kh·kw)
               dX  = dgrad(dZ, W)                 dgrad graph
Graphs are built once per shape, dtype, layout and precision, and cached; the layer
side (`vggcaffe/gpu/conv.py`) picks among them. Where a fused graph has no
engine, forward falls back to a plain conv graph with bias and ReLU as one
CuPy kernel (`bias_relu`).

Autotuning (as cudnn.benchmark; on unless VGGCAFFE_CUDNN_AUTOTUNE=0): each
convolution graph builds those of cuDNN's first CANDIDATES heuristic-ranked
plans that build and need at most WORKSPACE_LIMIT of workspace; its first run
times each on the real operands, screening out with one run those much
slower than the best so far, and keeps the fastest for that cached graph
(shape, dtype, precision).
Strict fp32 differs: its top-ranked plans (TF32 engines) never build (the
first ~25 of ~40 for VGG's layers), and its fast plans are legacy engines
that need 0.4-5 GiB of workspace. So the walk goes down the whole ranking; a
candidate may need as much workspace as the first plan that builds (the one
cuDNN's own build picks, whose workspace is needed anyway) or WORKSPACE_LIMIT,
whichever is more; the timing uses the shared workspace, so tuning holds no
extra memory; and engine 0 (the reference kernel, 50-650x slower on VGG's
layers) is never timed. With the 1 GiB limit alone the fast plans were all
barred and VGG-16 fp32 training fell from 494 to 95 img/s.
"""
import os
import time

import cupy
import numpy as np

from ..blob import is_channels_last  # noqa: F401 (used as cudnn_conv.is_channels_last)
from .kernels import BF16

try:
    import cudnn
except ImportError:        # the frontend is optional; conv then runs as im2col + cuBLAS
    cudnn = None

_graphs = {}
_devices = {}

AUTOTUNE = os.environ.get("VGGCAFFE_CUDNN_AUTOTUNE", "1") != "0"
CANDIDATES = 10            # heuristic-ranked plans built per graph, at most
SCREEN = 1.5               # a candidate whose first run is slower than this x the best is not timed further
BUILD_SECONDS = 1.0        # after this long building a graph's plans, build no more (two at least)
WORKSPACE_LIMIT = 1 << 30  # plans needing more workspace (bytes) are not candidates

bias_relu = cupy.ElementwiseKernel(
    "float32 b, bool relu", "float32 y", "float v = y + b; y = (relu && v < 0.0f) ? 0.0f : v", "vggcaffe_bias_relu")


def applies(layer, x):
    """True when `layer` on input `x` can run here: cuDNN present, float32 (or, in bf16 nets,
    bfloat16) CuPy data, one group."""
    return (cudnn is not None and isinstance(x, cupy.ndarray) and x.dtype in (np.float32, BF16)
            and layer.group == 1 and x.ndim == 4)


# --- per-device state ---------------------------------------------------------
def _device():
    """The cuDNN handle (bound to CuPy's current stream) and scratch of this device."""
    dev = cupy.cuda.Device().id
    state = _devices.get(dev)
    if state is None:
        state = _devices[dev] = {"handle": cudnn.create_handle(), "scratch": {}}
    cudnn.set_stream(handle=state["handle"], stream=cupy.cuda.get_current_stream().ptr)
    return state


def scratch(slot, shape, dtype):
    """A reusable device array for `slot`; grows, never shrinks; shared by all layers.
    A grown buffer's old memory goes back to the device, not to CuPy's pool cache."""
    buffers = _device()["scratch"]
    size = max(int(np.prod(shape, dtype=np.int64)), 1)
    buf = buffers.get((slot, np.dtype(dtype).str))
    if buf is None or buf.size < size:
        if buf is not None:
            del buf, buffers[(slot, np.dtype(dtype).str)]
            cupy.get_default_memory_pool().free_all_blocks()
        buf = cupy.empty(size, dtype)
        buffers[(slot, np.dtype(dtype).str)] = buf
    return buf[:int(np.prod(shape, dtype=np.int64))].reshape(shape)


def release():
    """Free the shared scratch buffers (the cached graphs stay)."""
    for state in _devices.values():
        state["scratch"].clear()


def _nhwc_strides(shape):
    n, c, h, w = shape
    return [c * h * w, 1, c * w, c]


def _strides(shape, layout):
    """cuDNN strides of an (N, C, H, W) tensor held in `layout` ("nhwc" or "nchw")."""
    if layout == "nhwc":
        return _nhwc_strides(shape)
    n, c, h, w = shape
    return [c * h * w, h * w, w, 1]


# --- graphs ---------------------------------------------------------------------
class Plan:
    """A built cuDNN graph; `run(name=device pointer, ...)` executes it. Given
    candidates [(plan index, workspace bytes)], its first run times each on the
    operands it was given and keeps the fastest (`index`, `timings` in ms)."""

    def __init__(self, graph, tensors, candidates=(), shared_workspace=False):
        self.graph, self.tensors = graph, tensors
        self.candidates = list(candidates)
        self.shared_workspace = shared_workspace    # time candidates in the shared scratch workspace
        self.index, self.timings = None, {}
        self.workspace = 0 if self.candidates else int(graph.get_workspace_size())

    def run(self, **pointers):
        handle = _device()["handle"]
        pack = {self.tensors[k]: int(p) for k, p in pointers.items()}
        if self.candidates:
            self._tune(pack, handle)
        ws = scratch("workspace", (max(self.workspace, 1),), np.uint8)
        if self.index is None:
            self.graph.execute(pack, ws.data.ptr, handle=handle)
        else:
            self.graph.execute_plan_at_index(pack, ws.data.ptr, index=self.index, handle=handle)

    def _tune(self, pack, handle):
        """Time each candidate once after a warm-up run; those within SCREEN x the best so
        far, three more times; keep the fastest mean (a slow plan costs two runs)."""
        candidates, self.candidates = self.candidates, []
        most = max(w for _, w in candidates) + 1
        ws = scratch("workspace", (most,), np.uint8) if self.shared_workspace else cupy.empty(most, np.uint8)
        error, means = None, {}
        for index, workspace in candidates:
            def launch():
                self.graph.execute_plan_at_index(pack, ws.data.ptr, index=index, handle=handle)
            try:
                first = _elapsed_ms(launch, repeats=1)
                if means and first > SCREEN * min(means.values()):
                    self.timings[index] = first
                    continue
                self.timings[index] = means[index] = _elapsed_ms(launch)
            except Exception as e:  # a plan that built but cannot run these operands
                error = e
        if not self.shared_workspace:
            del ws
            cupy.get_default_memory_pool().free_all_blocks()  # the timing workspace is not kept
        if not means:
            raise error
        self.index = min(means, key=means.get)
        self.workspace = dict(candidates)[self.index]


def _elapsed_ms(launch, repeats=3):
    """Mean GPU time of `launch()` over `repeats` runs after one warm-up run."""
    launch()
    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    start.record()
    for _ in range(repeats):
        launch()
    end.record()
    end.synchronize()
    return cupy.cuda.get_elapsed_time(start, end) / repeats


def _build_candidates(graph, strict):
    """[(index, workspace)] of the candidate plans that built (see the module docstring;
    `strict`: strict fp32's walk). Past the first, plans compiled at runtime (NVRTC,
    slow to build) are skipped."""
    built, start, limit = [], time.perf_counter(), WORKSPACE_LIMIT
    count = int(graph.get_execution_plan_count())
    for index in range(count if strict else min(count, CANDIDATES)):
        if len(built) >= CANDIDATES or (len(built) >= 2 and time.perf_counter() - start > BUILD_SECONDS):
            break
        if built and (_compiled_at_runtime(graph, index) or (strict and _is_engine_0(graph, index))):
            continue
        try:
            graph.build_plan_at_index(index)
            workspace = int(graph.get_workspace_size_plan_at_index(index))
        except Exception:  # cuDNN declines plans with several exception types
            continue
        if strict and not built:
            limit = max(limit, workspace)
        if workspace <= limit:
            built.append((index, workspace))
    return built


def _is_engine_0(graph, index):
    try:
        return graph.get_plan_name_at_index(index).split("_")[0] == "eng0"
    except Exception:  # no name to read: not excluded
        return False


def _compiled_at_runtime(graph, index):
    try:
        notes = graph.get_behavior_notes_for_plan_at_index(index)
    except Exception:  # no notes to read: treat the plan as precompiled
        return False
    return cudnn.behavior_note.RUNTIME_COMPILATION in notes


def _types(precision):
    fp32 = cudnn.data_type.FLOAT
    return (cudnn.data_type.BFLOAT16 if precision == "bf16" else fp32), fp32


def _plan(key, build, convolution=True):
    """The cached Plan for `key`; `build(graph, io_type)` declares the graph, returns its tensors.
    Strict fp32 deselects TF32 engines for convolutions (reductions have no such engines to drop)."""
    plan = _graphs.get(key)
    if plan is None:
        precision = key[-1]
        io, fp32 = _types(precision)
        graph = cudnn.pygraph(io_data_type=io, intermediate_data_type=fp32, compute_data_type=fp32,
                              handle=_device()["handle"])
        if precision == "fp32" and convolution:
            notes = cudnn.numerical_note
            graph.deselect_numeric_notes([notes.TENSOR_CORE, notes.DOWN_CONVERT_INPUTS])
        tensors = build(graph, io)
        graph.validate()
        graph.build_operation_graph()
        graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        graph.check_support()
        strict = precision == "fp32"
        candidates = _build_candidates(graph, strict) if AUTOTUNE and convolution else []
        if not candidates:
            graph.build_plans()
        plan = _graphs[key] = Plan(graph, tensors, candidates, shared_workspace=strict)
    return plan


def _conv_args(geom):
    pad, stride, dilation = geom
    return dict(padding=list(pad), stride=list(stride), dilation=list(dilation))


def fprop_plan(x_shape, w_shape, y_shape, geom, bias, relu, out_io, precision, layout="nhwc"):
    def build(g, io):
        fp32 = cudnn.data_type.FLOAT
        x = g.tensor(name="X", dim=list(x_shape), stride=_strides(x_shape, layout), data_type=io)
        w = g.tensor(name="W", dim=list(w_shape), stride=_strides(w_shape, layout), data_type=io)
        y = g.conv_fprop(image=x, weight=w, compute_data_type=fp32, **_conv_args(geom))
        tensors = {"X": x, "W": w}
        if bias:
            k = w_shape[0]
            tensors["B"] = g.tensor(name="B", dim=[1, k, 1, 1], stride=[k, 1, 1, 1], data_type=fp32)
            y = g.bias(input=y, bias=tensors["B"], compute_data_type=fp32)
        if relu:
            y = g.relu(input=y, compute_data_type=fp32)
        y.set_output(True).set_dim(list(y_shape)).set_stride(_strides(y_shape, layout))
        y.set_data_type(io if out_io else fp32)
        tensors["Y"] = y
        return tensors
    return _plan(("fprop", x_shape, w_shape, geom, bias, relu, out_io, layout, precision), build)


def dgrad_plan(dy_shape, w_shape, x_shape, geom, out_io, precision, layout="nhwc"):
    def build(g, io):
        dy = g.tensor(name="DY", dim=list(dy_shape), stride=_strides(dy_shape, layout), data_type=io)
        w = g.tensor(name="W", dim=list(w_shape), stride=_strides(w_shape, layout), data_type=io)
        dx = g.conv_dgrad(loss=dy, filter=w, compute_data_type=cudnn.data_type.FLOAT, **_conv_args(geom))
        dx.set_output(True).set_dim(list(x_shape)).set_stride(_strides(x_shape, layout))
        dx.set_data_type(io if out_io else cudnn.data_type.FLOAT)
        return {"DY": dy, "W": w, "DX": dx}
    return _plan(("dgrad", dy_shape, w_shape, x_shape, geom, out_io, layout, precision), build)


def wgrad_plan(x_shape, dy_shape, w_shape, geom, out_io, precision, layout="nhwc"):
    def build(g, io):
        x = g.tensor(name="X", dim=list(x_shape), stride=_strides(x_shape, layout), data_type=io)
        dy = g.tensor(name="DY", dim=list(dy_shape), stride=_strides(dy_shape, layout), data_type=io)
        dw = g.conv_wgrad(image=x, loss=dy, compute_data_type=cudnn.data_type.FLOAT, **_conv_args(geom))
        dw.set_output(True).set_dim(list(w_shape)).set_stride(_strides(w_shape, layout))
        dw.set_data_type(io if out_io else cudnn.data_type.FLOAT)
        return {"X": x, "DY": dy, "DW": dw}
    return _plan(("wgrad", x_shape, dy_shape, w_shape, geom, out_io, layout, precision), build)


def bias_grad_plan(dy_shape, precision, layout="nhwc"):
    def build(g, io):
        k = dy_shape[1]
        dy = g.tensor(name="DY", dim=list(dy_shape), stride=_strides(dy_shape, layout), data_type=io)
        db = g.reduction(input=dy, mode=cudnn.reduction_mode.ADD, compute_data_type=cudnn.data_type.FLOAT)
        db.set_output(True).set_dim([1, k, 1, 1]).set_stride([k, 1, 1, 1]).set_data_type(cudnn.data_type.FLOAT)
        return {"DY": dy, "DB": db}
    return _plan(("bias_grad", dy_shape, layout, precision), build, convolution=False)

