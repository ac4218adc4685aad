"""GPU precision policy: fp32 (strict, Caffe's numbers), tf32, or bf16.

fp32   float32 storage and math: cuBLAS without TF32, cuDNN engines with
       tensor-core (TF32) or down-converting numerics deselected.
tf32   float32 storage, TF32 tensor-core math in cuBLAS and cuDNN.
bf16   float32 blobs and master weights (the SGD update stays float32);
       convolutions compute on bfloat16 copies of activations and weights
       (cuDNN, float32 accumulation); other GEMMs use TF32.
The policy is process-wide; cuDNN graphs are cached per precision.

Convolution memory layout: tf32 and bf16 run channels-last (NHWC; tensor cores
want it). Strict fp32 runs channels-last too unless `set_fp32_layout("nchw")`
(or VGGCAFFE_FP32_LAYOUT=nchw) asks for NCHW, the layout PyTorch's fp32
convolutions run in: cuDNN's non-tensor-core engines differ by layout (its
FFT algorithms, for one, are documented for NCHW only);
`tools/bench_gpu.py --precisions fp32 fp32-nchw` compares the two.
Convolutions read it at every call; prepare nets after choosing it (a net
prepared channels-last copies its blobs to NCHW at every convolution).
"""
import os

from ..errors import VggcaffeError

PRECISIONS = ("fp32", "tf32", "bf16")
LAYOUTS = ("nhwc", "nchw")

_state = {"name": "fp32", "fp32_layout": os.environ.get("VGGCAFFE_FP32_LAYOUT", "nhwc").lower()}


def set_precision(name):
    """Choose the precision for everything run on the GPU from now on."""
    name = (name or "fp32").lower()
    if name not in PRECISIONS:
        raise VggcaffeError(f"unknown precision '{name}'; choose one of {', '.join(PRECISIONS)}")
    _state["name"] = name
    _set_cublas_math(name != "fp32")
    return name


def get_precision():
    return _state["name"]


def set_fp32_layout(name):
    """Choose the memory layout of strict-fp32 convolutions: "nhwc" or "nchw"."""
    name = (name or "nhwc").lower()
    if name not in LAYOUTS:
        raise VggcaffeError(f"unknown layout '{name}'; choose one of {', '.join(LAYOUTS)}")
    _state["fp32_layout"] = name
    return name


def conv_layout(precision=None):
    """The memory layout convolutions run in under `precision` (default: the current one)."""
    precision = precision or _state["name"]
    if precision == "fp32" and _state["fp32_layout"] not in LAYOUTS:
        raise VggcaffeError(f"VGGCAFFE_FP32_LAYOUT='{_state['fp32_layout']}': choose one of {', '.join(LAYOUTS)}")
    return _state["fp32_layout"] if precision == "fp32" else "nhwc"


def _set_cublas_math(tf32):
    """CuPy's GEMM compute type for float32: TF32 tensor cores or plain FP32."""
    import numpy as np
    from cupy._core import _routines_linalg as linalg
    os.environ["CUPY_TF32"] = "1" if tf32 else "0"      # read by CuPy where the call below is missing
    if hasattr(linalg, "set_compute_type"):
        linalg.set_compute_type(np.float32, linalg.COMPUTE_TYPE_TF32 if tf32 else linalg.COMPUTE_TYPE_DEFAULT)
