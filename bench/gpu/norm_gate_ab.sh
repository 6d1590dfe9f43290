#!/usr/bin/env bash
# One H200 (device tool, kind nvidia-h200, carrying .whl), one call: `dig train` DiG-XL/2 at 256 px / 32 images with
# the norm-gate Triton kernels (default) and with the torch expression that inductor fuses
# (model.overrides.norm_gate_kernel=false), side by side beside the bare graphed step; then the shape-safety GPU
# test of compiled DiG (batch 32/31/64, 256 and 512 px, CFG's doubled batch) now that blocks reorient their input.
set -u
REAL_OUT=$OUT; export OUT=/tmp/ab; mkdir -p "$OUT"
source bench/gpu/env.sh
TAIL=12 run train "${TRAIN_LIMIT:-260}" python3 -m bench.bench_train --models DiG-XL/2 --resolutions 256 --gpus 1 \
  --steps 24 --warmup 9 --log-every 3 --checkpoint-at 18 --bare-mode reduce-overhead --timeout 200 \
  --extra "torch-norm-gate:model.overrides.norm_gate_kernel=false" --out "$OUT/train"
TAIL=4 run any_batch "${TEST_LIMIT:-230}" python3 -m pytest -m gpu -q \
  "tests/test_gpu.py::test_compiled_dig_accepts_any_batch_and_resolution_in_one_process"
show_failures "$OUT"/*.log
cp "$OUT"/train/bench_train.json "$OUT"/train.log "$OUT"/any_batch.log "$REAL_OUT"/ 2>/dev/null
tar czf "$REAL_OUT/results.tgz" -C "$OUT" . && ls "$REAL_OUT"
