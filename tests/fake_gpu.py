"""A stand-in for CuPy and NVIDIA's cudnn frontend on NumPy, to run the GPU backend's
Python on a machine without a GPU: `VGGCAFFE_FAKE_GPU=1 python -m pytest tests/test_gpu.py`
(tests/conftest.py installs it before any test imports cupy), and
`python -m tests.fake_gpu train ... --gpu 0` for the command line.

What it is:
- `cupy`: "device" arrays are NumPy arrays of a subclass whose module is `cupy` (so
  vggcaffe.backend.array_module takes them for CuPy's), `.data.ptr` their address;
  NumPy's functions stand in for CuPy's, ufuncs refusing host-array operands as CuPy
  does; reads of device values on the host are counted (`cupy.host_reads()`); `empty` returns NaN bytes (CuPy's pool hands
  out stale memory); streams and events run at once (no asynchrony:
  tests/test_gpu_feed_on_cpu.py covers that). RawKernels are compiled for the CPU with
  g++ (tests/cuda_on_cpu.py) and run one thread per grid row walking their grid-stride
  loops; their arguments are checked as CuPy needs them (a device array per pointer, a
  NumPy scalar of the parameter's exact type per scalar), and blocks of at most 1024
  threads. ElementwiseKernels run as a generated C++ loop over their broadcast
  operands; typed array operands must be device arrays of that dtype, outputs of the
  broadcast shape. The tiled transpose kernel, whose threads share tiles between
  __syncthreads, is replaced by NumPy after checking its types, grid and block.
- `cudnn`: graphs record their operations; executing one reads the operands through
  their pointers, dims, strides and data types (an unset output type is the graph's
  io type, as in the frontend), computes the convolution, bias, ReLU or reduction in
  float64, and writes the outputs (bfloat16 rounded to nearest even); two "plans" per
  graph, equal, no workspace; no graph is ever refused.
So the Python of the GPU path (layouts, strides, dtypes, launch arguments, plans,
caches, preparation) runs for real against NumPy's results. Not covered: speed,
races, alignment, shared-memory bounds, cuDNN's numerics (TF32 is exact here, so
strict-fp32 and tf32 bounds pass trivially) and engine choices, cuDNN refusing a
graph (the fallback configurations never run), host arrays in device calls other than
ufuncs (NumPy functions accept them; CuPy raises), and the CUDA source of the transpose.
"""
import ctypes
import re
import shutil
import sys
import tempfile
import time
import types

import numpy as np

from .cuda_on_cpu import compile_library, from_bf16_bits, to_bf16_bits

BF16 = np.dtype(np.uint16)
_build = {"dir": None}


def _build_dir():
    if _build["dir"] is None:
        _build["dir"] = tempfile.mkdtemp(prefix="vggcaffe-fake-gpu-")
        import atexit
        atexit.register(shutil.rmtree, _build["dir"], True)
    return _build["dir"]


# --- arrays ---------------------------------------------------------------------------
class _Pointer:
    def __init__(self, ptr):
        self.ptr = ptr


HOST_READS = [0]          # device-to-host reads so far (CuPy keeps no such count)


def _read(method):
    def read(self, *args, **kwargs):
        HOST_READS[0] += 1
        return method(self, *args, **kwargs)
    return read


class ndarray(np.ndarray):
    """A "device" array; reading it on the host (float(), bool(), item(), get(), ...) counts
    in HOST_READS."""
    __float__, __int__, __bool__, __index__ = (_read(getattr(np.ndarray, m))
                                               for m in ("__float__", "__int__", "__bool__", "__index__"))
    item, tolist = _read(np.ndarray.item), _read(np.ndarray.tolist)

    @property
    def data(self):
        return _Pointer(self.__array_interface__["data"][0])

    @property
    def device(self):
        return _Device(0)

    def get(self, stream=None, out=None):
        HOST_READS[0] += 1
        if out is None:
            return np.array(self.view(np.ndarray))
        out[...] = self.view(np.ndarray)
        return out

    def set(self, arr, stream=None):
        np.copyto(self.view(np.ndarray), arr)

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        """NumPy's ufunc on the arrays' memory; a host array among the operands is an error,
        as in CuPy (which never converts one implicitly)."""
        out = kwargs.get("out", ())
        for a in inputs + tuple(out):
            if type(a) is np.ndarray and a.ndim:
                raise TypeError(f"{ufunc.__name__}: Unsupported type {type(a)} (a host array among device operands)")
        host = [a.view(np.ndarray) if isinstance(a, ndarray) else a for a in inputs]
        if out:
            kwargs["out"] = tuple(a.view(np.ndarray) if isinstance(a, ndarray) else a for a in out)
        result = getattr(ufunc, method)(*host, **kwargs)
        if out:
            return out[0] if len(out) == 1 else out
        return _device(result)


ndarray.__module__ = "cupy"


def _device(r):
    if isinstance(r, np.ndarray) and not isinstance(r, ndarray):
        return r.view(ndarray)
    if isinstance(r, np.generic):
        return np.asarray(r).view(ndarray)          # CuPy's reductions return 0-d arrays
    if isinstance(r, tuple):
        return tuple(_device(v) for v in r)
    return r


def _wrap(f):
    def call(*args, **kwargs):
        return _device(f(*args, **kwargs))
    call.__name__ = getattr(f, "__name__", "f")
    return call


def _namespace(name, source, **own):
    """A module whose attributes are `own`, else `source`'s functions returning device arrays."""
    module = types.ModuleType(name)
    module.__dict__.update(own)

    def missing(attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        value = getattr(source, attr)
        return _wrap(value) if callable(value) and not isinstance(value, type) else value
    module.__getattr__ = missing
    return module


def asarray(a, dtype=None, order=None):
    if isinstance(a, ndarray) and (dtype is None or np.dtype(dtype) == a.dtype) and order is None:
        return a
    return np.array(a, dtype=dtype, order=order or "K").view(ndarray)


def asnumpy(a, stream=None, out=None):
    HOST_READS[0] += isinstance(a, ndarray)
    a = np.array(a.view(np.ndarray) if isinstance(a, ndarray) else a)
    if out is not None:
        out[...] = a
        return out
    return a


def ascontiguousarray(a, dtype=None):
    if isinstance(a, ndarray) and a.flags.c_contiguous and (dtype is None or np.dtype(dtype) == a.dtype):
        return a
    if not isinstance(a, ndarray):                  # a host array: copied to the device, never aliased
        return np.array(a, dtype=dtype, order="C", copy=True).view(ndarray)
    return np.ascontiguousarray(a, dtype=dtype).view(ndarray)


def empty(shape, dtype=np.float64, order="C"):
    """Uninitialised device memory: filled with 0xFF bytes (NaN), as CuPy's pool hands out
    stale data, so code that reads what it never wrote fails here too."""
    a = np.empty(shape, dtype, order)
    a.view(np.uint8).fill(0xFF)
    return a.view(ndarray)


def empty_like(a, dtype=None):
    return empty(np.shape(a), a.dtype if dtype is None else dtype)


def _device_array(a, what):
    if not isinstance(a, ndarray):
        raise TypeError(f"{what}: Unsupported type {type(a)} (a host array where a device array is needed)")
    return a


# --- kernels -----------------------------------------------------------------------------
_C_TYPES = {"float32": "float", "float64": "double", "uint16": "unsigned short", "bool": "bool",
            "int32": "int", "int64": "long long", "uint8": "unsigned char", "uint32": "unsigned int"}


class ElementwiseKernel:
    """CuPy's ElementwiseKernel for typed params: operands broadcast, made contiguous, and
    run through a generated C++ loop (outputs copied back where given non-contiguous)."""

    def __init__(self, in_params, out_params, operation, name="kernel", **kwargs):
        self.ins = [p.split() for p in in_params.split(",")]
        self.outs = [p.split() for p in out_params.split(",")]
        self.name = name
        decls = [f"const {_C_TYPES[t]}* in_{v}" for t, v in self.ins] + [f"{_C_TYPES[t]}* out_{v}" for t, v in self.outs]
        loads = "".join(f"{_C_TYPES[t]} {v} = in_{v}[i]; " for t, v in self.ins)
        loads += "".join(f"{_C_TYPES[t]} {v} = out_{v}[i]; " for t, v in self.outs)
        stores = "".join(f"out_{v}[i] = {v}; " for _, v in self.outs)
        self.code = (f'extern "C" void {name}(long long n, {", ".join(decls)}) {{\n'
                     f"  for (long long i = 0; i < n; ++i) {{ {loads}\n {{ {operation}; }}\n {stores} }}\n}}\n")
        self.function = None

    def __call__(self, *args, size=None, stream=None):
        inputs, outputs = args[:len(self.ins)], list(args[len(self.ins):])
        for a, (t, v) in zip(list(inputs) + outputs, self.ins + self.outs):     # as CuPy: arrays typed exactly
            if isinstance(a, np.ndarray) and a.ndim:
                _device_array(a, f"{self.name} argument {v}")
                if a.dtype != np.dtype(t):
                    raise TypeError(f"{self.name}: Type is mismatched. {v} {np.dtype(t)} {a.dtype}")
        shape = np.broadcast_shapes(*[np.shape(a) for a in list(inputs) + outputs])
        if any(o.shape != shape for o in outputs):
            raise ValueError(f"{self.name}: Out shape is mismatched")
        ins = [np.ascontiguousarray(np.broadcast_to(np.asarray(a, dtype=t), shape)) for a, (t, _) in zip(inputs, self.ins)]
        if not outputs:
            outputs = [empty(shape, t) for t, _ in self.outs]
        buffers = [np.ascontiguousarray(o.view(np.ndarray), dtype=t) for o, (t, _) in zip(outputs, self.outs)]
        if self.function is None:
            self.function = getattr(compile_library(self.code, self.name, _build_dir()), self.name)
        n = int(np.prod(shape, dtype=np.int64))
        self.function(ctypes.c_longlong(n), *[ctypes.c_void_p(a.ctypes.data) for a in ins + buffers])
        for out, buf in zip(outputs, buffers):
            if buf.ctypes.data != out.__array_interface__["data"][0] or buf.strides != out.strides:
                np.copyto(out.view(np.ndarray), buf)
        return outputs[0] if len(outputs) == 1 else tuple(outputs)


def _transpose(grid, block, args, code):
    """The tiled transpose kernel (kernels._TRANSPOSE): y[b] = x[b].T, casting, adding when
    compiled with ACCUMULATE = 1."""
    x, y, rows, cols = args
    in_t, out_t = re.search(r"transpose\(const ([\w ]+)\* x, ([\w ]+)\* y", code).groups()
    batch = x.size // (int(rows) * int(cols))
    for a, t in ((x, in_t), (y, out_t)):
        if _device_array(a, "transpose").dtype != _DTYPES[t] or not a.flags.c_contiguous:
            raise TypeError(f"transpose: {t}* argument given a {a.dtype} array (contiguous: {a.flags.c_contiguous})")
    if not (isinstance(rows, np.int32) and isinstance(cols, np.int32)) or tuple(grid) != (
            (int(cols) + 31) // 32, (int(rows) + 31) // 32, batch) or tuple(block) != (32, 8, 1):
        raise ValueError(f"transpose: launch {grid} x {block} for {batch} x {rows} x {cols}")
    x32 = _load(x.view(np.ndarray).reshape(-1, int(rows), int(cols)))
    out = y.view(np.ndarray).reshape(-1, int(cols), int(rows))
    value = x32.transpose(0, 2, 1)
    if "if (1) v +=" in code:
        value = value + _load(out)
    _store(out, value)


def _load(a):
    return from_bf16_bits(a) if a.dtype == BF16 else a.astype(np.float32)


def _store(a, value):
    a[...] = to_bf16_bits(value) if a.dtype == BF16 else value


_DTYPES = {c: np.dtype(name) for name, c in _C_TYPES.items()}      # C type -> NumPy dtype
_SCALARS = {"int": (np.int32, ctypes.c_int), "unsigned int": (np.uint32, ctypes.c_uint),
            "long long": (np.int64, ctypes.c_longlong), "unsigned long long": (np.uint64, ctypes.c_ulonglong),
            "float": (np.float32, ctypes.c_float), "double": (np.float64, ctypes.c_double)}


def _parameters(code, name):
    """The parameter types of kernel `name` in `code`: "float*", "int", "long long", ..."""
    match = re.search(rf'extern "C" __global__ void {name}\s*\(([^)]*)\)', code)
    if match is None:
        raise ValueError(f"no extern \"C\" __global__ kernel {name} in the source")
    types_ = []
    for param in match.group(1).split(","):
        words = param.replace("*", " * ").replace("const", " ").replace("__restrict__", " ").split()[:-1]
        types_.append(" ".join(w for w in words if w != "*") + ("*" if "*" in words else ""))
    return types_


def _argument(name, ctype, value):
    """`value` for a parameter of `ctype` as it must be given to CuPy: a device array for a
    pointer, a NumPy scalar of exactly that type for a scalar (CuPy would pass a Python int
    as 64 bits and a float as a double, which the kernel would misread)."""
    if ctype.endswith("*"):          # CuPy checks no element type: a dummy pointer is fine
        return ctypes.c_void_p(_device_array(value, f"{name} argument {ctype}").__array_interface__["data"][0])
    numpy_type, c_type = _SCALARS[ctype]
    if type(value) is not numpy_type:
        raise TypeError(f"{name}: {ctype} argument given {type(value).__name__} {value!r}")
    return c_type(value.item())


class RawKernel:
    """CuPy's RawKernel: compiled for the CPU, run once per (blockIdx.y, blockIdx.z) with
    one thread walking the grid-stride loop in x."""

    def __init__(self, code, name, *args, **kwargs):
        self.code, self.name, self.library = code, name, None

    def __call__(self, grid, block, args, shared_mem=0, stream=None):
        if self.name == "transpose":
            return _transpose(grid, block, args, self.code)
        if self.library is None:
            self.library = compile_library(self.code, self.name, _build_dir())
        params = _parameters(self.code, self.name)
        if len(params) != len(args):
            raise TypeError(f"{self.name}: {len(args)} arguments for {len(params)} parameters")
        values = [_argument(self.name, t, a) for t, a in zip(params, args)]
        threads = int(np.prod(tuple(block)))
        if not 1 <= threads <= 1024 or shared_mem > 48 * 1024:
            raise ValueError(f"{self.name}: block {block} ({threads} threads), {shared_mem} bytes of shared memory")
        if shared_mem and "extern __shared__" not in self.code:
            raise ValueError(f"{self.name}: dynamic shared memory given to a kernel that declares none")
        grid = tuple(grid) + (1,) * (3 - len(grid))
        for y in range(grid[1]):
            for z in range(grid[2]):
                self.library.vggcaffe_set_grid(y, z, grid[1], grid[2])
                getattr(self.library, self.name)(*values)


# --- cupy.cuda -------------------------------------------------------------------------------
class _Device:
    def __init__(self, device_id=0):
        self.id = int(device_id)
        self.pci_bus_id = "0000:00:00.0"

    def use(self):
        return self

    def synchronize(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _Event:
    def __init__(self, block=False, disable_timing=False, interprocess=False):
        self.time = None

    def record(self, stream=None):
        self.time = time.perf_counter()

    def synchronize(self):
        pass

    @property
    def done(self):
        return True


class _Stream:
    ptr = 0

    def __init__(self, null=False, non_blocking=False, ptds=False):
        pass

    def synchronize(self):
        pass

    def wait_event(self, event):
        pass

    def record(self, event=None):
        event = event or _Event()
        event.record(self)
        return event

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _Pool:
    def free_all_blocks(self, stream=None):
        pass

    def used_bytes(self):
        return 0

    def total_bytes(self):
        return 0

    def malloc(self, size):
        return _Pointer(0)


_POOL, _STREAM = _Pool(), _Stream()


def _elapsed_ms(start, end):
    return 1000.0 * (end.time - start.time)


def _cublas_gemm(transa, transb, a, b, out=None, alpha=1.0, beta=0.0):
    a = a.T if transa == "T" else a
    b = b.T if transb == "T" else b
    product = alpha * (a.view(np.ndarray) @ b.view(np.ndarray))
    if out is None:
        return product.view(ndarray)
    out.view(np.ndarray)[...] = product + beta * out.view(np.ndarray) if beta else product
    return out


def make_cupy():
    cuda = types.SimpleNamespace(
        Device=_Device, Event=_Event, Stream=_Stream, get_current_stream=lambda: _STREAM,
        get_elapsed_time=_elapsed_ms, alloc_pinned_memory=lambda n: bytearray(max(int(n), 1)),
        set_allocator=lambda allocator=None: None, MemoryPointer=_Pointer,
        runtime=types.SimpleNamespace(getDeviceCount=lambda: 1,
                                      getDeviceProperties=lambda i: {"name": b"vggcaffe fake GPU (NumPy)"}))
    random = _namespace("cupy.random", np.random, RandomState=_RandomState,
                        standard_normal=lambda shape, dtype=np.float64: np.random.standard_normal(shape)
                        .astype(dtype).view(ndarray))
    linalg = types.SimpleNamespace(set_compute_type=lambda dtype, kind: None, COMPUTE_TYPE_TF32=1,
                                   COMPUTE_TYPE_DEFAULT=0)
    core = types.ModuleType("cupy._core")
    core._routines_linalg = linalg
    cupy = _namespace("cupy", np, ndarray=ndarray, asarray=asarray, empty=empty, empty_like=empty_like, array=lambda a, dtype=None, copy=True:
                      np.array(a, dtype=dtype).view(ndarray), asnumpy=asnumpy, ascontiguousarray=ascontiguousarray,
                      ElementwiseKernel=ElementwiseKernel, RawKernel=RawKernel, cuda=cuda, random=random,
                      get_default_memory_pool=lambda: _POOL, get_array_module=lambda *a: sys.modules["cupy"],
                      cublas=types.SimpleNamespace(gemm=_cublas_gemm), _core=core, __version__="fake",
                      host_reads=lambda: HOST_READS[0])
    return cupy, {"cupy._core": core, "cupy._core._routines_linalg": linalg}


class _RandomState:
    def __init__(self, seed=None):
        self.state = np.random.RandomState(seed)

    def random_sample(self, size=None, dtype=np.float64):
        return self.state.random_sample(size).astype(dtype).view(ndarray)

    def standard_normal(self, size=None, dtype=np.float64):
        return self.state.standard_normal(size).astype(dtype).view(ndarray)


# --- cudnn -----------------------------------------------------------------------------------
class _Tensor:
    def __init__(self, graph, op=None, inputs=(), name="", dim=None, stride=None, data_type=None, **args):
        self.graph, self.op, self.inputs, self.args = graph, op, list(inputs), args
        self.name, self.dim, self.stride, self.data_type, self.output = name, dim, stride, data_type, False

    def set_output(self, value):
        self.output = bool(value)
        return self

    def set_dim(self, dim):
        self.dim = list(dim)
        return self

    def set_stride(self, stride):
        self.stride = list(stride)
        return self

    def set_data_type(self, data_type):
        self.data_type = data_type
        return self

    def set_name(self, name):
        self.name = name
        return self


_FLOAT, _BFLOAT16 = "FLOAT", "BFLOAT16"


def _view(tensor, ptr):
    """The NumPy view of a tensor at a device pointer (its dims, strides and data type)."""
    data_type = tensor.data_type or tensor.graph.io
    dtype = BF16 if data_type == _BFLOAT16 else np.dtype(np.float32)
    extent = sum((d - 1) * s for d, s in zip(tensor.dim, tensor.stride)) + 1
    buffer = (ctypes.c_char * (extent * dtype.itemsize)).from_address(ptr)
    flat = np.frombuffer(buffer, dtype, extent)
    return np.lib.stride_tricks.as_strided(flat, tensor.dim, [s * dtype.itemsize for s in tensor.stride])


def _taps(kh, kw, stride, dilation, out_hw):
    """Per kernel offset (i, j): the rows and columns of the padded input it multiplies."""
    ho, wo = out_hw
    for i in range(kh):
        for j in range(kw):
            r, c = i * dilation[0], j * dilation[1]
            yield i, j, slice(r, r + stride[0] * (ho - 1) + 1, stride[0]), slice(c, c + stride[1] * (wo - 1) + 1, stride[1])


def _padded(x, pad):
    return np.pad(x, ((0, 0), (0, 0), (pad[0], pad[0]), (pad[1], pad[1])))


class _Graph:
    """cudnn.pygraph: the operations used by vggcaffe.gpu.cudnn_conv, run by NumPy."""

    def __init__(self, io_data_type=None, intermediate_data_type=None, compute_data_type=None, handle=None, **kwargs):
        self.outputs, self.io = [], io_data_type

    def tensor(self, name="", dim=None, stride=None, data_type=None):
        return _Tensor(self, None, (), name, list(dim), list(stride), data_type)

    def _op(self, op, inputs, **args):
        t = _Tensor(self, op, inputs, data_type=None, **args)     # unset: the graph's io type (as the frontend)
        self.outputs.append(t)
        return t

    def conv_fprop(self, image, weight, padding, stride, dilation, compute_data_type=None, name=""):
        return self._op("fprop", [image, weight], geom=(padding, stride, dilation))

    def conv_dgrad(self, loss, filter, padding, stride, dilation, compute_data_type=None, name=""):
        return self._op("dgrad", [loss, filter], geom=(padding, stride, dilation))

    def conv_wgrad(self, image, loss, padding, stride, dilation, compute_data_type=None, name=""):
        return self._op("wgrad", [image, loss], geom=(padding, stride, dilation))

    def bias(self, input, bias, compute_data_type=None, name=""):
        return self._op("bias", [input, bias])

    def relu(self, input, compute_data_type=None, name=""):
        return self._op("relu", [input])

    def reduction(self, input, mode, compute_data_type=None, name=""):
        return self._op("sum", [input])

    def deselect_numeric_notes(self, notes):
        pass

    def validate(self):
        pass

    build_operation_graph = check_support = build_plans = validate

    def create_execution_plans(self, modes):
        pass

    def get_execution_plan_count(self):
        return 2

    def build_plan_at_index(self, index):
        pass

    def get_workspace_size_plan_at_index(self, index):
        return 0

    def get_workspace_size(self):
        return 0

    def get_plan_name_at_index(self, index):
        return f"eng{index + 1}_fake"

    def get_behavior_notes_for_plan_at_index(self, index):
        return []

    def execute_plan_at_index(self, pack, workspace, index=0, handle=None):
        self.execute(pack, workspace, handle)

    def execute(self, pack, workspace, handle=None):
        values = {}
        for t in self.outputs:
            if t.output:
                _store(_view(t, pack[t]), self._value(t, pack, values).astype(np.float32))

    def _value(self, t, pack, values):
        """t's value in float64 (values: those already computed in this execution)."""
        if t not in values:
            values[t] = _load(_view(t, pack[t])).astype(np.float64) if t.op is None else self._run(t, pack, values)
        return values[t]

    def _run(self, t, pack, values):
        a = [self._value(i, pack, values) for i in t.inputs]
        if t.op == "bias":
            return a[0] + a[1]
        if t.op == "relu":
            return np.maximum(a[0], 0)
        if t.op == "sum":
            return a[0].sum(axis=(0, 2, 3), keepdims=True)
        pad, stride, dilation = t.args["geom"]
        if t.op == "fprop":
            x, w = a
            out_hw = [(size + 2 * p - d * (k - 1) - 1) // s + 1
                      for size, p, d, k, s in zip(x.shape[2:], pad, dilation, w.shape[2:], stride)]
            xp, y = _padded(x, pad), np.zeros((x.shape[0], w.shape[0], *out_hw))
            for i, j, rows, cols in _taps(*w.shape[2:], stride, dilation, out_hw):
                y += np.einsum("nchw,kc->nkhw", xp[:, :, rows, cols], w[:, :, i, j], optimize=True)
            return y
        if t.op == "dgrad":
            dy, w = a
            n, c, h, wd = t.dim
            dxp = np.zeros((n, c, h + 2 * pad[0], wd + 2 * pad[1]))
            for i, j, rows, cols in _taps(*w.shape[2:], stride, dilation, dy.shape[2:]):
                dxp[:, :, rows, cols] += np.einsum("nkhw,kc->nchw", dy, w[:, :, i, j], optimize=True)
            return dxp[:, :, pad[0]:pad[0] + h, pad[1]:pad[1] + wd]
        x, dy = a                                         # wgrad
        xp, dw = _padded(x, pad), np.zeros(t.dim)
        for i, j, rows, cols in _taps(*t.dim[2:], stride, dilation, dy.shape[2:]):
            dw[:, :, i, j] = np.einsum("nkhw,nchw->kc", dy, xp[:, :, rows, cols], optimize=True)
        return dw


def make_cudnn():
    names = lambda *keys: types.SimpleNamespace(**{k: k for k in keys})     # noqa: E731
    return types.SimpleNamespace(
        pygraph=_Graph, create_handle=lambda: object(), set_stream=lambda handle=None, stream=None: None,
        data_type=names(_FLOAT, _BFLOAT16, "HALF"), numerical_note=names("TENSOR_CORE", "DOWN_CONVERT_INPUTS"),
        heur_mode=names("A", "B", "FALLBACK"), reduction_mode=names("ADD"), behavior_note=names("RUNTIME_COMPILATION"),
        backend_version=lambda: 0, __version__="fake")


def install():
    """Put the stand-ins in sys.modules as `cupy` and `cudnn` (before anything imports them)."""
    cupy, submodules = make_cupy()
    sys.modules["cupy"] = cupy
    sys.modules.update(submodules)
    cudnn = types.ModuleType("cudnn")
    cudnn.__dict__.update(vars(make_cudnn()))
    sys.modules["cudnn"] = cudnn


if __name__ == "__main__":         # python -m tests.fake_gpu ARGS: `vggcaffe ARGS` on the stand-ins
    install()
    from vggcaffe.cli import main
    sys.exit(main())
