"""Test session setup: with VGGCAFFE_FAKE_GPU=1 the GPU tests run against tests/fake_gpu.py's
NumPy stand-ins for CuPy and the cudnn frontend (installed before any test imports them)."""
import os

if os.environ.get("VGGCAFFE_FAKE_GPU") == "1":
    from tests.fake_gpu import install
    install()
