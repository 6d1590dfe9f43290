#!/usr/bin/env bash
# One H200 (device tool, kind nvidia-h200, carrying .whl), one call: where the bare graphed training step (blocks
# compiled with CUDA graphs, fused AdamW, bf16 autocast) of each model in MODELS leaves the GPU idle, at each
# RESxBATCH in CASES, one process per row: bench.bench_trainer_overhead --bare-only --gpu-idle 3, its report in
# idle_<model>_<case>.log and (TRACES=1, the default) the profiler trace beside it, gzipped, for
# `python3 -m bench.gpu_idle TRACE --steps 3`; all of it in $OUT/results.tgz (the device tool returns 8 files).
#   CASES=512x32,256x32 MODELS=DiG-XL/2,DiT-XL/2 bash bench/gpu/idle_compare.sh
set -u
REAL_OUT=$OUT; export OUT=${SCRATCH:-/tmp/idle_compare}; mkdir -p "$OUT"
source bench/gpu/env.sh
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
IFS=',' read -ra cases <<< "${CASES:-512x32,256x32}"
IFS=',' read -ra models <<< "${MODELS:-DiG-XL/2,DiT-XL/2}"
for case_ in "${cases[@]}"; do
  for model in "${models[@]}"; do
    name="idle_${model//\//_}_${case_}"
    trace=()
    [ "${TRACES:-1}" = 1 ] && trace=(--trace "$OUT/${name}")
    TAIL=${TAIL_IDLE:-40} run "$name" "${IDLE_LIMIT:-170}" python3 -m bench.bench_trainer_overhead --model "$model" \
        --resolution "${case_%x*}" --batch "${case_#*x}" --bare-only --bare-compile-mode reduce-overhead \
        --steps 8 --warmup 6 --gpu-idle 3 ${trace[@]+"${trace[@]}"} --json "$OUT/${name}.json"
  done
done
show_failures "$OUT"/*.log
ls -la "$OUT"
tar czf "$REAL_OUT/results.tgz" -C "$OUT" --exclude pip.log . && ls -la "$REAL_OUT"
