#!/usr/bin/env bash
# Issue 11 on a 4x H200 machine (device tool, kind nvidia-h200-x4, carrying .whl): `dig train` DiG-XL/2 256 px,
# 32 images per GPU, on 1, 2 and 4 GPUs with the default fp32 gradient exchange and with
# engine.grad_allreduce_dtype=bf16 side by side (is bf16 worth making the default? scaling was 0.85-0.89 on
# 2-4 GPUs with fp32); then, if PIN_AB=1, one GPU with torch's multi-threaded host registration for the
# checkpoint's pinned buffers (PYTORCH_CUDA_ALLOC_CONF) against the first run's first-save blocking time.
set -u
source bench/gpu/env.sh
common=(--models DiG-XL/2 --resolutions 256 --steps 24 --warmup 9 --log-every 3 --checkpoint-at 18 --timeout 200
        --bare-mode reduce-overhead)
GPUS=${GPUS:-1,2,4}  # GPUS=1,2 on a 2-GPU machine
extras=()
for n in ${GPUS//,/ }; do [ "$n" -gt 1 ] && extras+=(--extra "bf16-allreduce@$n:engine.grad_allreduce_dtype=bf16"); done
timeout "${BENCH_LIMIT:-480}" python3 -m bench.bench_train "${common[@]}" --gpus "$GPUS" "${extras[@]}" \
    --out "$OUT/ab" 2>&1 | grep -v "^\[" | tail -14
if [ "${PIN_AB:-1}" = 1 ]; then
  PYTORCH_CUDA_ALLOC_CONF=pinned_use_cuda_host_register:True,pinned_num_register_threads:8 \
    timeout "${PIN_LIMIT:-110}" python3 -m bench.bench_train "${common[@]}" --gpus 1 --no-bare --out "$OUT/pin" 2>&1 \
    | grep -v "^\[" | tail -4
fi
show_failures "$OUT"/ab/*.log "$OUT"/pin/*.log
cd "$OUT" && tar czf runs.tgz ab pin 2>/dev/null && rm -rf ab/*.log pin/*.log ab/*.jsonl pin/*.jsonl
