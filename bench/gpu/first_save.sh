#!/usr/bin/env bash
# Issue 11 on a 1- or 2-GPU machine (device tool, carrying .whl): does pinning host buffers in a background thread
# slow GPU work (bench_pinning, both host allocators), and how long does the first checkpoint save block now that
# the writer pins its buffers after the first step (`dig train` DiG-XL/2 256 px, 32 images per GPU, save at step 18
# and 24). GPUS=1 (default 1,2) on a one-GPU machine. The NCCL-channel A/B is bench/gpu/nccl_channels.sh.
set -u
source bench/gpu/env.sh
TAIL=12 run pinning 150 python3 -m bench.bench_pinning --ways pin-beside-work,pin-beside-work-register \
    --out "$OUT/pinning.json"
timeout "${BENCH_LIMIT:-330}" python3 -m bench.bench_train --models DiG-XL/2 --resolutions 256 --steps 24 --warmup 9 \
    --log-every 3 --checkpoint-at 18 --timeout 200 --bare-mode reduce-overhead --gpus "${GPUS:-1,2}" \
    --out "$OUT/train" 2>&1 | grep -v "^\[" | tail -6
show_failures "$OUT"/train/*.log
grep -h "checkpoint state copied\|not prepared" "$OUT"/train/*.log | cut -c1-160
cd "$OUT" && tar czf runs.tgz train && rm -rf train/*.log train/*.jsonl
