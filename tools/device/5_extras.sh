#!/bin/bash
# Device run 5: what each bf16 kernel gives per layer (vggcaffe time with all on, the 8-channel pool kernels
# off, the small-C conv kernels off), then VGG-16 inference and VGG-19 training rows for BENCHMARKS.md.
source "$(dirname "$0")/env.sh"
for V in "on" "VGGCAFFE_POOL_VECTOR=0" "VGGCAFFE_SMALL_C=never"; do
  env $([ "$V" = on ] || echo $V) timeout 60 python3 -m vggcaffe.cli time --model models/D_train_val.prototxt --gpu 0 \
      --batch 64 --iterations 5 --precision bf16 > "$OUT/time_D_bf16_${V%%=*}.log" 2>&1
  echo "time D bf16 [$V] rc=$?"; grep -E "conv1_1|pool[12]|Forward-Backward|Throughput" "$OUT/time_D_bf16_${V%%=*}.log" | cut -c45- | head -10
done
timeout 200 python3 tools/bench_gpu.py --models D --modes infer --precisions fp32 fp32-nchw tf32 bf16 --iters 20 \
    --warmup 3 --json $OUT/bench_D_infer.json > $OUT/bench_D_infer.log 2>&1
echo "bench D infer rc=$?"; grep -E "^\| [DE] |memory" $OUT/bench_D_infer.log | cut -c1-220
timeout 200 python3 tools/bench_gpu.py --models E --modes train --precisions fp32 tf32 bf16 --iters 20 \
    --warmup 3 --json $OUT/bench_E.json > $OUT/bench_E.log 2>&1
echo "bench E rc=$?"; grep -E "^\| [DE] " $OUT/bench_E.log
