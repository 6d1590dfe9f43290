#!/usr/bin/env bash
# One H200 (device tool, kind nvidia-h200, carrying .whl), one call: the bare graphed step of DiG-XL/2 at 256 px /
# 32 images with each block compiled and graphed on its own (compile_blocks, what the trainer does) against the
# whole block stack as one compiled region (compile_block_stack: one CUDA graph for all blocks each way, no host
# work between blocks), with the GPU idle report of each. The stack compiles all 28 blocks: allow minutes.
set -u
REAL_OUT=$OUT; export OUT=/tmp/stack; mkdir -p "$OUT"
source bench/gpu/env.sh
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
BARE=(python3 -m bench.bench_trainer_overhead --model "${MODEL:-DiG-XL/2}" --batch 32 --bare-only
      --bare-compile-mode reduce-overhead --steps 15 --warmup 8 --gpu-idle 4)
TAIL=30 run blocks "${BLOCKS_LIMIT:-200}" "${BARE[@]}" --json "$OUT/bare_blocks.json"
TAIL=30 run stack "${STACK_LIMIT:-360}" "${BARE[@]}" --bare-compile-scope stack --json "$OUT/bare_stack.json"
show_failures "$OUT"/*.log
cp "$OUT"/blocks.log "$OUT"/stack.log "$OUT"/bare_blocks.json "$OUT"/bare_stack.json "$REAL_OUT"/ 2>/dev/null
tar czf "$REAL_OUT/results.tgz" -C "$OUT" . && ls "$REAL_OUT"
