#!/bin/bash
# Device run 4: issue 5's "the data pipeline keeps the GPU fed": VGG-16 training from host data (NpzData of
# 256x256 uint8 images -> 224 crops, flips, colour shift) with the GPU feed on and off, against the same steps
# on GPU-resident data and torchvision's vgg16 with a DataLoader.
source "$(dirname "$0")/env.sh"
nproc
timeout ${FEED_T:-420} python3 tools/bench_feed.py --precisions bf16 fp32 --iters 100 > $OUT/bench_feed.log 2>&1
echo "bench_feed rc=$?"; cut -c1-250 $OUT/bench_feed.log | grep -v "^ " | tail -8
timeout 150 python3 tools/bench_feed.py --precisions bf16 --iters 60 --jitter > $OUT/bench_feed_jitter.log 2>&1
echo "bench_feed --jitter rc=$?"; cut -c1-250 $OUT/bench_feed_jitter.log | grep -v "^ " | tail -4
