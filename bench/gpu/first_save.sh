#!/usr/bin/env bash
# Issue 11 on a 2-GPU machine (device tool, kind nvidia-h200-x2, carrying .whl): does pinning host buffers in a
# background thread slow GPU work (bench_pinning, both host allocators), and how long does the first checkpoint
# save block now that the writer pins its buffers after the first step (`dig train` DiG-XL/2 256 px, 32 images per
# GPU, 1 and 2 GPUs, save at step 18 and 24); then 2 GPUs with NCCL held to 4 channels (fewer SMs taken from the
# backward by the overlapped all-reduce) against the default. GPUS=1 on a one-GPU machine.
set -u
source bench/gpu/env.sh
TAIL=12 run pinning 150 python3 -m bench.bench_pinning --ways pin-beside-work,pin-beside-work-register \
    --out "$OUT/pinning.json"
common=(--models DiG-XL/2 --resolutions 256 --steps 24 --warmup 9 --log-every 3 --checkpoint-at 18 --timeout 200
        --bare-mode reduce-overhead)
timeout "${BENCH_LIMIT:-330}" python3 -m bench.bench_train "${common[@]}" --gpus "${GPUS:-1,2}" --out "$OUT/train" 2>&1 \
    | grep -v "^\[" | tail -6
[[ ,${GPUS:-1,2}, == *,2,* ]] && NCCL_MAX_NCHANNELS=4 timeout "${NCCL_LIMIT:-130}" python3 -m bench.bench_train "${common[@]}" --gpus 2 --no-bare \
    --out "$OUT/nccl4" 2>&1 | grep -v "^\[" | tail -4
for f in "$OUT"/train/*.log "$OUT"/nccl4/*.log; do
  [ -f "$f" ] && grep -q Traceback "$f" && { echo "== failed: $f"; grep -v '^\s*$' "$f" | tail -n 12; }
done
grep -h "checkpoint state copied\|not prepared" "$OUT"/train/*.log "$OUT"/nccl4/*.log | cut -c1-160
cd "$OUT" && tar czf runs.tgz train $(ls -d nccl4 2>/dev/null) && rm -rf train/*.log nccl4/*.log train/*.jsonl nccl4/*.jsonl
