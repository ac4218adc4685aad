"""Run vggcaffe's CUDA kernel sources on the CPU, for tests on machines without a GPU.

A kernel's source is compiled as C++ (g++) with a prelude standing in for CUDA's
built-ins (thread indices, vector types, bit casts), and called once as a single
thread: every kernel here walks its elements in a grid-stride loop, so that one
thread does all the work in order. This checks indexing, dtype handling and
arithmetic; not what only a GPU shows (races, alignment faults, speed).

`gpu_modules()` imports vggcaffe.gpu's modules against a stand-in `cupy` whose
arrays are NumPy's and whose RawKernel compiles its source this way when called
(so host code such as MaxPoolGPU runs unchanged on NumPy blobs), and removes them
again, so the real CuPy (where present) and the real vggcaffe.gpu are untouched.
"""
import atexit
import contextlib
import ctypes
import hashlib
import importlib
import os
import shutil
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import numpy as np

PRELUDE = r"""
#include <algorithm>
#include <cstring>
using std::max;
using std::min;
#define __global__
#define __device__
#define __forceinline__ inline
struct Dim { unsigned x, y, z; };
static Dim blockIdx{0, 0, 0}, threadIdx{0, 0, 0}, blockDim{1, 1, 1}, gridDim{1, 1, 1};
struct float4 { float x, y, z, w; };
struct uint4 { unsigned int x, y, z, w; };
struct uint2 { unsigned int x, y; };
inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }
inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return {a, b, c, d}; }
inline uint2 make_uint2(unsigned a, unsigned b) { return {a, b}; }
inline float __uint_as_float(unsigned int u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned int __float_as_uint(float f) { unsigned int u; std::memcpy(&u, &f, 4); return u; }
inline void __syncthreads() {}
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
extern "C" void vggcaffe_set_grid(unsigned by, unsigned bz, unsigned gy, unsigned gz) {
    blockIdx.y = by; blockIdx.z = bz; gridDim.y = gy; gridDim.z = gz;
}
"""
COMPILER = shutil.which("g++")


class _SourceKernel:
    """The stand-in cupy.RawKernel: keeps the source and the kernel's name; a call
    compiles it for the CPU (once) and runs it on the NumPy arrays given."""
    build_dir = None

    def __init__(self, code, name, *args, **kwargs):
        self.code, self.name = code, name

    def __call__(self, grid, block, args, shared_mem=0):
        if _SourceKernel.build_dir is None:
            _SourceKernel.build_dir = tempfile.mkdtemp(prefix="vggcaffe-cuda-on-cpu-")
            atexit.register(shutil.rmtree, _SourceKernel.build_dir, True)
        launch(compile_kernel(self.code, self.name, _SourceKernel.build_dir), args)


@contextlib.contextmanager
def gpu_modules(names=("kernels", "pooling", "conv", "small_c"), **attributes):
    """vggcaffe.gpu's modules `names`, imported against a stand-in CuPy (with `attributes`
    added to or replacing its own)."""
    stub = types.ModuleType("cupy")
    stub.RawKernel, stub.ElementwiseKernel = _SourceKernel, lambda *args, **kwargs: None
    stub.ndarray, stub.cuda = np.ndarray, types.SimpleNamespace()
    stub.empty, stub.zeros, stub.asarray = np.empty, np.zeros, np.asarray
    stub.__dict__.update(attributes)
    import vggcaffe
    saved = {name: module for name, module in sys.modules.items()
             if name in ("cupy", "cudnn") or name.startswith("vggcaffe.gpu")}
    package = vggcaffe.__dict__.get("gpu")            # `from vggcaffe import gpu` reads this attribute
    for name in saved:
        del sys.modules[name]
    sys.modules["cupy"], sys.modules["cudnn"] = stub, None
    try:
        yield types.SimpleNamespace(**{name: importlib.import_module(f"vggcaffe.gpu.{name}")
                                       for name in names})
    finally:
        for name in [n for n in sys.modules if n in ("cupy", "cudnn") or n.startswith("vggcaffe.gpu")]:
            del sys.modules[name]
        sys.modules.update(saved)
        if package is None:
            vggcaffe.__dict__.pop("gpu", None)
        else:
            vggcaffe.gpu = package


def compile_library(code, name, build_dir):
    """CUDA source `code` compiled for the CPU (ctypes library) in build_dir, the prelude
    first. A kernel's dynamic shared memory becomes a static array."""
    source = PRELUDE + code.replace("extern __shared__ float ws[];", "static float ws[16384];")
    key = hashlib.sha1(source.encode()).hexdigest()[:16]
    library = Path(build_dir) / f"{name}_{key}.so"
    if not library.exists():
        cpp = library.with_suffix(f".{os.getpid()}.cpp")
        cpp.write_text(source)
        partial = library.with_suffix(f".{os.getpid()}.so")
        subprocess.run([COMPILER, "-O1", "-shared", "-fPIC", "-w", str(cpp), "-o", str(partial)], check=True)
        os.replace(partial, library)
    return ctypes.CDLL(str(library))


def compile_kernel(code, name, build_dir):
    """The kernel `name` of CUDA source `code` as a C function (ctypes), built in build_dir."""
    return getattr(compile_library(code, name, build_dir), name)


def launch(kernel, args):
    """Call a compiled kernel: arrays by pointer, np.int64 as long long, np.int32/int as int."""
    values = []
    for a in args:
        if isinstance(a, np.ndarray):
            values.append(ctypes.c_void_p(a.ctypes.data))
        elif isinstance(a, np.int64):
            values.append(ctypes.c_longlong(int(a)))
        else:
            values.append(ctypes.c_int(int(a)))
    kernel(*values)


def to_bf16_bits(a):
    """The bfloat16 bits (uint16) of float32 values rounded to nearest, ties to even, NaN
    kept quiet: what the kernels' bf16_bits does."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    return np.where(nan, (u >> 16) | 0x40, (u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16).reshape(np.shape(a))


def round_bf16(a):
    """float32 values rounded to the nearest bfloat16 (ties to even), as float32."""
    return from_bf16_bits(to_bf16_bits(a))


def bf16_bits(a):
    """The bfloat16 bits (uint16) of float32 values that are bfloat16 already."""
    return (np.ascontiguousarray(a, np.float32).view(np.uint32) >> 16).astype(np.uint16)


def from_bf16_bits(bits):
    return (bits.astype(np.uint32) << 16).view(np.float32)


def channels_last(shape, dtype):
    """A zeroed (N, C, H, W) view of NHWC memory."""
    n, c, h, w = shape
    return np.zeros((n, h, w, c), dtype).transpose(0, 3, 1, 2)
