#!/usr/bin/env bash
# Issue 15, the README table "GPU memory and batch per GPU" (BENCHMARKS.md "Memory"), on one H200 (device tool,
# kind nvidia-h200, carrying .whl: the usual set of ../shared/gpu/prepare-wheels.sh; no diffusers, Ray or MLflow
# needed). `dig bench memory`: DiG-XL/2, DiT-XL/2, DiG-L/2, DiG-B/2, DiG-S/2 at 256/512/1024 px, the real `dig train`
# step of configs/train/dig-xl2-imagenet256.yaml, the largest micro-batch per GPU with and without activation
# checkpointing; then the recipe's exact compile (CUDA graphs) at DiG-XL/2 256 px. One process per model and resolution; rows are
# written to $OUT/bench_memory_rows.jsonl as each finishes, so a run cut short keeps what it measured. Models not
# started within BUDGET seconds are listed as skipped: run them again with e.g.
#   MODELS=DiG-B/2,DiG-S/2 CHECK=none bash bench/gpu/memory_table.sh
# Triton autotuners keep their first config (bench/triton_first_config): no minutes of autotuning, and a kernel's
# config does not change what is allocated.
set -u
source bench/gpu/env.sh
export PYTHONPATH=$PWD/bench/triton_first_config:$PYTHONPATH
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv | tee "$OUT/gpu.txt"
t0=$SECONDS
timeout "${LIMIT:-560}" python3 -m bench.bench_memory --budget-s "${BUDGET:-450}" \
    --models "${MODELS:-DiG-XL/2,DiT-XL/2,DiG-L/2,DiG-B/2,DiG-S/2}" --recipe-check "${CHECK:-DiG-XL/2@256}" \
    --out "$OUT" > "$OUT/bench_memory.log" 2>&1
echo "bench memory rc=$? $((SECONDS - t0))s"
grep "^\[bench_memory\] [^ ]* [0-9]*px\|recipe check\|skipped" "$OUT/bench_memory.log" | cut -c1-200
sed -n '/^| model/,$p' "$OUT/bench_memory.log"
grep -m5 -i "traceback\|error\|recompil\|warning: " "$OUT/bench_memory.log" | cut -c1-300
