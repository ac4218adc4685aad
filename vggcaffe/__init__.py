"""vggcaffe: Caffe-style nets in prototxt, run on NumPy (CPU) or CuPy (GPU), reproducing VGG.

Before NumPy loads OpenBLAS: its idle worker threads spin for ~0.1 s after each
GEMM by default, taking a core from the copy threads that run between GEMMs
(vggcaffe.layers.convolution). With the shortest spin OpenBLAS allows (2^4 cycles;
they then sleep until the next GEMM wakes them) a CPU training step of the demo
net on 2 cores is 10-15% faster than with the default, and 1-2% faster than
with 2^16. A value already in the environment is kept.
"""
import os

os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

from .backend import set_device, set_mode_cpu, set_mode_gpu  # noqa: F401
from .errors import VggcaffeError  # noqa: F401

TRAIN = "TRAIN"
TEST = "TEST"


def get_solver(path):
    """pycaffe's get_solver: the solver a solver prototxt describes (vggcaffe's is SGD)."""
    from .solver import SGDSolver
    return SGDSolver(path)


def __getattr__(name):
    # Net and SGDSolver pull in every layer module; load them on first use.
    if name == "Net":
        from .net import Net
        return Net
    if name == "SGDSolver":
        from .solver import SGDSolver
        return SGDSolver
    if name == "Classifier":        # pycaffe's caffe.Classifier
        from .classifier import Classifier
        return Classifier
    if name == "io":                # pycaffe's caffe.io (Transformer, load_image, ...)
        import importlib
        return importlib.import_module(".io", __name__)
    if name == "Layer":             # the base of Python layers (pycaffe's caffe.Layer)
        from .layers.python import PythonLayerBase
        return PythonLayerBase
    raise AttributeError(name)
