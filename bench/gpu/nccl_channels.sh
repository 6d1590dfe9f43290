#!/usr/bin/env bash
# Issue 11 on a 2- or 4-GPU machine (device tool, kind nvidia-h200-x2/-x4, carrying .whl): is the per-GPU loss from
# 1 to N GPUs (0.85-0.93) the SMs that NCCL's all-reduce takes from the backward it overlaps with? On 2026-11-29 a
# bf16 gradient exchange (half the bytes) gave +1 %, so the 2-GPU step is not bound by NVLink bandwidth. Runs
# `dig train` DiG-XL/2 256 px, 32 images per GPU on 1 GPU, then on N GPUs (N=2 by default) with NCCL's default
# channel count and with NCCL_MAX_NCHANNELS=16, 8, 4, one after another, the machine to themselves.
set -u
source bench/gpu/env.sh
N=${N:-2}
common=(--models DiG-XL/2 --resolutions 256 --steps 24 --warmup 9 --log-every 3 --checkpoint-at 24 --timeout 150
        --bare-mode reduce-overhead --no-bare)
timeout 160 python3 -m bench.bench_train "${common[@]}" --gpus "1,$N" --out "$OUT/default" 2>&1 | grep -v "^\[" | tail -4
for ch in ${CHANNELS:-16 8 4}; do
  NCCL_MAX_NCHANNELS=$ch timeout 120 python3 -m bench.bench_train "${common[@]}" --gpus "$N" --out "$OUT/ch$ch" 2>&1 \
    | grep -v "^\[" | tail -2 | sed "s/^/NCCL_MAX_NCHANNELS=$ch /"
done
show_failures "$OUT"/*/*.log
cd "$OUT" && tar czf runs.tgz default ch* && rm -rf default ch*
