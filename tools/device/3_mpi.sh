#!/bin/bash
# Device run 3: issue 6 on the one-GPU machine (2 ranks sharing the GPU through pinned host buffers:
# equivalence with one process, abort, logging once; the allreduce time of VGG-16's 138M parameters for
# SCALING.md), then PyTorch's per-layer strict-fp32 times and the NCHW plan probe for issue 5.
DEVICE_MPI=1 source "$(dirname "$0")/env.sh"
which mpirun; python3 -c "from mpi4py import MPI; print(MPI.Get_library_version()[:60])"
timeout 240 python3 -m pytest -q -rfE --tb=short -p no:cacheprovider tests/test_parallel.py > $OUT/test_parallel.log 2>&1
echo "test_parallel rc=$?"; tail -3 $OUT/test_parallel.log; grep -E "^(FAILED|ERROR)|^E " $OUT/test_parallel.log | head -10
timeout 120 mpirun --oversubscribe --allow-run-as-root -np 2 python3 tools/bench_allreduce.py --gpu \
    --model models/D_train_val.prototxt --batch 64 > $OUT/bench_allreduce.log 2>&1
echo "bench_allreduce rc=$?"; tail -8 $OUT/bench_allreduce.log
timeout 60 python3 tools/time_torch_layers.py --model D --batch 64 --precision fp32 > $OUT/time_torch_D_fp32.log 2>&1
echo "torch layers rc=$?"; grep -E "conv[1-5]_[12]|pool1|Sum|Forward-Backward|Throughput" $OUT/time_torch_D_fp32.log | head -14
timeout 60 python3 tools/probe_fp32_plans.py --seconds 55 --layers conv3_2 conv1_2 --layouts nchw > $OUT/probe.log 2>&1
echo "probe rc=$?"; cut -c1-900 $OUT/probe.log
