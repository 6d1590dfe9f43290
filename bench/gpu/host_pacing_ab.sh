#!/usr/bin/env bash
# One H200 (device tool, kind nvidia-h200, carrying .whl), one call: the trainer's host settings through `dig
# train` (DiG-XL/2, 256 px, 32 images; main's defaults: garbage collection every 50 steps with automatic GC off,
# GIL hand-over every 0.5 ms), against Python's own settings and each setting alone, one run after the other;
# then DiT-XL/2 with the defaults for the DiG/DiT ratio.
set -u
REAL_OUT=$OUT; export OUT=/tmp/pacing; mkdir -p "$OUT"
source bench/gpu/env.sh
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
TAIL=12 run train "${TRAIN_LIMIT:-560}" python3 -m bench.bench_train --models "${MODELS:-DiG-XL/2,DiT-XL/2}" \
  --resolutions 256 --gpus 1 "${TRAIN_WINDOWS[@]}" --timeout "${RUN_TIMEOUT:-170}" \
  --no-bare --extra "python-host:host.gc_every=0,host.gil_switch_interval_ms=5" \
  --extra "gc-only:host.gil_switch_interval_ms=5" --extra "switch-only:host.gc_every=0" --out "$OUT/train"
show_failures "$OUT"/*.log "$OUT"/train/*.log
cp "$OUT"/train/bench_train.json "$OUT"/train.log "$REAL_OUT"/ 2>/dev/null
tar czf "$REAL_OUT/results.tgz" -C "$OUT" . && ls "$REAL_OUT"
