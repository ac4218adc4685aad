#!/bin/bash
# Device run 1: issue 5's correctness point, tests/test_gpu.py on the GPU (every GPU layer and a VGG-16
# forward+backward against NumPy in fp32/tf32/bf16, the conv fallbacks, the feed, ClassSelect, box regression).
source "$(dirname "$0")/env.sh"
T0=$SECONDS
timeout ${TEST_T:-500} python3 -m pytest -q -rfE --tb=short -p no:cacheprovider -s tests/test_gpu.py > $OUT/test_gpu.log 2>&1
echo "pytest rc=$? $((SECONDS-T0))s"; grep -E "passed|failed|error" $OUT/test_gpu.log | tail -1
grep -E "^(FAILED|ERROR)|^E " $OUT/test_gpu.log | cut -c1-250 | head -20
grep -E "VGG-16 .*worst" $OUT/test_gpu.log | cut -c1-300
