#!/usr/bin/env bash
# One H200 (device tool, kind nvidia-h200, carrying .whl), one call: `dig train` at 256 px / 32 images with main's
# defaults for $MODELS (default DiG-XL/2 and DiT-XL/2; $EXTRA adds bench_train --extra runs of the first, several
# separated by ';', e.g. EXTRA=eager-loss:model.compile_loss=false), then (unless IDLE=0) where the DiG step leaves
# the GPU idle, in the bare graphed step and in the trainer's step with the recipe's engine (ZeRO-0, amp, compiled
# blocks with CUDA graphs, no clipping): bench.bench_trainer_overhead --gpu-idle (torch.profiler trace, gaps
# charged to phases and ops).
set -u
REAL_OUT=$OUT; export OUT=${SCRATCH:-/tmp/idle}; mkdir -p "$OUT"
source bench/gpu/env.sh
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
EXTRAS=()
IFS=';' read -ra _extra <<< "${EXTRA:-}"
for e in "${_extra[@]}"; do [ -n "$e" ] && EXTRAS+=(--extra "$e"); done
TAIL=${TRAIN_TAIL:-8} run train "${TRAIN_LIMIT:-250}" python3 -m bench.bench_train --models "${MODELS:-DiG-XL/2,DiT-XL/2}" \
  --resolutions 256 --gpus 1 "${TRAIN_WINDOWS[@]}" --timeout "${RUN_TIMEOUT:-170}" \
  --no-bare "${EXTRAS[@]}" --out "$OUT/train"
if [ "${IDLE:-1}" != 0 ]; then
  TAIL=60 run idle "${IDLE_LIMIT:-300}" "${RECIPE_STEP[@]}" --steps 10 --warmup 8 --gpu-idle 4 --log-every 100 \
    --out "$OUT/idle"
fi
show_failures "$OUT"/*.log "$OUT"/train/*.log
cp "$OUT"/train/bench_train.json "$OUT"/idle.log "$OUT"/train.log "$REAL_OUT"/ 2>/dev/null
cp "$OUT"/idle/*.json "$REAL_OUT"/trainer_overhead.json 2>/dev/null
tar czf "$REAL_OUT/results.tgz" -C "$OUT" . && ls "$REAL_OUT"
