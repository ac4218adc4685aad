"""The GPU tests against tests/fake_gpu.py's NumPy stand-ins for CuPy and cuDNN, in a
subprocess (the stand-ins replace `cupy` for the whole process): every layer and
convolution case in each precision and layout, the kernels, the SGD update and the data
feed, so the GPU path's Python runs in every CI run. The whole-VGG-16 and command-line
cases (~11 min here) run with `VGGCAFFE_FAKE_GPU=1 python -m pytest tests/test_gpu.py`.
Skipped without g++ (the stand-in compiles the CUDA kernels with it)."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from .cuda_on_cpu import COMPILER

pytestmark = pytest.mark.skipif(COMPILER is None, reason="needs g++ to compile the CUDA sources for the CPU")


def test_gpu_tests_pass_on_the_numpy_stand_ins():
    root = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if not k.startswith("VGGCAFFE_")}   # the defaults, whatever the caller set
    env["VGGCAFFE_FAKE_GPU"] = "1"
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "tests/test_gpu.py",
                             "-k", "not vgg16 and not vgg_shapes and not cli"],
                            cwd=root, env=env, capture_output=True, text=True, timeout=600)
    lines = result.stdout.strip().splitlines()
    summary = lines[-1] if lines else result.stderr[-2000:]
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) >= 100, summary
    skips = [line for line in lines if line.startswith("SKIPPED")]
    assert all("real test data not found" in line for line in skips), skips    # only a clone without ../shared
