#!/usr/bin/env bash
# Issue 11, the measured table (BENCHMARKS.md "`dig train` at 32 images per GPU"): on a 4x H200 machine (device
# tool, kind nvidia-h200-x2 or -x4; GPUS=1,2,4 on four): `dig bench train`. The GPU tests that go with it (compiled DiG
# on any shape, resume on another GPU count, the overlapped all-reduce) are in gpu_tests.sh: the shape test alone
# compiles for minutes on a fresh machine.
set -u
source bench/gpu/env.sh
nvidia-smi --query-gpu=name,clocks.sm,memory.used --format=csv
timeout ${BENCH_LIMIT:-470} python3 -m bench.bench_train --models DiG-XL/2,DiT-XL/2 --resolutions 256,512 \
    --gpus ${GPUS:-1,2} --parallel --steps 24 --warmup 9 --log-every 3 --checkpoint-at 18 --timeout 300 \
    --bare-mode reduce-overhead --extra "zero3:engine.zero_stage=3,engine.precision=bf16" --out "$OUT/bt" 2>&1 \
    | grep -v "^\[" | tail -40
show_failures "$OUT"/bt/*.log
cp "$OUT"/bt/bench_train.json "$OUT"/ 2>/dev/null
cd "$OUT/bt" && tar czf "$OUT/logs.tgz" *.log 2>/dev/null; ls "$OUT"
