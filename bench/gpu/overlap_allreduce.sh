#!/usr/bin/env bash
# Issue 11 on 2 H200s: `dig train` (DiG-XL/2, 256 px, 32 images per GPU, the ImageNet-256 recipe) with the
# gradient all-reduce overlapped with the backward (default) and with DeepSpeed's reduce-after-backward, side by
# side, on 1 and 2 GPUs, after the GPU test of the overlapped all-reduce (NCCL) against DeepSpeed's.
set -u
source bench/gpu/env.sh
timeout 150 python3 -m pytest -m gpu tests/test_grad_allreduce.py -x -q 2>&1 | tail -n 5
timeout "${BENCH_LIMIT:-420}" python3 -m bench.bench_train --models DiG-XL/2 --resolutions 256 --gpus 1,2 \
  --steps 24 --warmup 9 --log-every 3 --checkpoint-at 18 --bare-mode reduce-overhead \
  --extra "no-overlap@2:engine.overlap_grad_allreduce=false" --out "$OUT" 2>&1 | tail -40
