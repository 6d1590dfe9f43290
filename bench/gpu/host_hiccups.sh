#!/usr/bin/env bash
# One H200 (device tool, kind nvidia-h200, carrying .whl), one call: do host hiccups make the trainer's step slower
# than the bare step? The trainer launches some block backward graphs 2-5 ms late (bench_trainer_overhead
# --gpu-idle, 2026-11-29); it runs threads the bare loop lacks, CPython hands the GIL over every 5 ms, and automatic
# GC pauses whichever thread allocates. The bare and the trainer step (recipe engine: ZeRO-0, amp, blocks compiled
# with CUDA graphs), each with its GPU idle report: Python's own settings; GIL hand-over every 0.5 ms; GC every 50
# steps only (the trainer's `host.*` settings, applied to both loops; before 2026-11-29's fifth session these were
# the bench's --switch-interval / --gc-every flags).
set -u
REAL_OUT=$OUT; export OUT=/tmp/hiccups; mkdir -p "$OUT"
source bench/gpu/env.sh
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
STEP=("${RECIPE_STEP[@]}" --steps 15 --warmup 8 --gpu-idle 4 --log-every 100)
TAIL=24 run as_is "${LIMIT:-170}" "${STEP[@]}" --set host.gc_every=0 --set host.gil_switch_interval_ms=5 --out "$OUT/as_is"
TAIL=24 run switch "${LIMIT:-170}" "${STEP[@]}" --set host.gc_every=0 --set host.gil_switch_interval_ms=0.5 --out "$OUT/switch"
TAIL=24 run gc "${LIMIT:-170}" "${STEP[@]}" --set host.gc_every=50 --set host.gil_switch_interval_ms=5 --out "$OUT/gc"
show_failures "$OUT"/*.log
cp "$OUT"/as_is.log "$OUT"/switch.log "$OUT"/gc.log "$REAL_OUT"/ 2>/dev/null
tar czf "$REAL_OUT/results.tgz" -C "$OUT" . && ls "$REAL_OUT"
