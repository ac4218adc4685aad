#!/bin/bash
# Device run 2: issue 5's speed and memory points, VGG-16 training in one bench_gpu.py run (strict fp32 in both
# layouts, tf32, bf16) against torchvision, then per-layer strict-fp32 times in each layout. If NCHW wins,
# make it strict fp32's default layout in vggcaffe/gpu/precision.py. Record the table in BENCHMARKS.md.
source "$(dirname "$0")/env.sh"
T0=$SECONDS
timeout ${BENCH_T:-340} python3 tools/bench_gpu.py --models D --modes train --precisions fp32 fp32-nchw tf32 bf16 \
    --iters 20 --warmup 3 --json $OUT/bench.json > $OUT/bench.log 2>&1
echo "bench rc=$? $((SECONDS-T0))s"; grep -E "^\| [DE] |memory" $OUT/bench.log | cut -c1-220
grep -o '"small_c_conv_ms".*' $OUT/bench.log | cut -c1-600; grep -o '"cudnn_autotune".*' $OUT/bench.log | cut -c1-400
for L in nhwc nchw; do
  VGGCAFFE_FP32_LAYOUT=$L timeout 90 python3 -m vggcaffe.cli time --model models/D_train_val.prototxt --gpu 0 \
      --batch 64 --iterations 5 --precision fp32 > $OUT/time_D_fp32_$L.log 2>&1
  echo "time D fp32 $L rc=$?"; grep -E "conv[1-5]_[12]|pool1|Forward-Backward|Throughput" $OUT/time_D_fp32_$L.log | cut -c45- | head -14
done
