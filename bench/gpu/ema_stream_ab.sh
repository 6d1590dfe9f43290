#!/usr/bin/env bash
# One H200 (device tool, kind nvidia-h200, carrying .whl), one call: the EMA update on a CUDA stream of its own
# (ema_side_stream=true: the ~2 ms memory-bound lerp over DiG-XL/2's fp32 weights beside the next step's forward,
# whose matmuls are compute-bound) against main's default (the update queued between the optimizer step and the
# next forward), `dig train` DiG-XL/2 at 256 px / 32 images, one run after the other; first the GPU test that the
# EMA comes out bit for bit the same. gpu_idle.sh's train part.
set -u
REAL_OUT=$OUT; export OUT=/tmp/emastream; mkdir -p "$OUT"
source bench/gpu/env.sh
TAIL=6 run gpu_test "${TEST_LIMIT:-200}" python3 -m pytest -m gpu tests/test_train_gpu.py -k ema_on_its_own -x -q
cp "$OUT"/gpu_test.log "$REAL_OUT"/ 2>/dev/null
OUT=$REAL_OUT EXTRA="ema-stream:ema_side_stream=true" MODELS=${MODELS:-DiG-XL/2} IDLE=0 SCRATCH=/tmp/emastream-train \
  TRAIN_LIMIT=${TRAIN_LIMIT:-300} TRAIN_TAIL=10 bash bench/gpu/gpu_idle.sh
