#!/usr/bin/env bash
# One H200 (device tool, kind nvidia-h200, carrying .whl): each block compiled and graphed on its own
# (compile_blocks, model.compile_scope=blocks, the default) against the whole block stack as one compiled region
# (compile_block_stack, model.compile_scope=stack: one CUDA graph for all blocks each way, no host work between
# blocks), DiG-XL/2 at 256 px / 32 images. The stack compiles all 28 blocks: allow minutes.
#   PARTS=bare:  the bare graphed step both ways, with the GPU idle report of each
#   PARTS=train: `dig train` both ways, one after the other
set -u
REAL_OUT=$OUT; export OUT=/tmp/stack; mkdir -p "$OUT"
source bench/gpu/env.sh
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
PARTS=${PARTS:-bare}
if [[ $PARTS == *bare* ]]; then
  BARE=(python3 -m bench.bench_trainer_overhead --model "${MODEL:-DiG-XL/2}" --batch 32 --bare-only
        --bare-compile-mode reduce-overhead --steps 15 --warmup 8 --gpu-idle 4)
  TAIL=30 run blocks "${BLOCKS_LIMIT:-200}" "${BARE[@]}" --json "$OUT/bare_blocks.json"
  TAIL=30 run stack "${STACK_LIMIT:-360}" "${BARE[@]}" --bare-compile-scope stack --json "$OUT/bare_stack.json"
fi
if [[ $PARTS == *train* ]]; then
  TAIL=8 run train "${TRAIN_LIMIT:-560}" python3 -m bench.bench_train --models "${MODEL:-DiG-XL/2}" \
    --resolutions 256 --gpus 1 "${TRAIN_WINDOWS[@]}" --timeout 400 --no-bare \
    --extra "stack:model.compile_scope=stack" --out "$OUT/train"
fi
show_failures "$OUT"/*.log
for f in blocks.log stack.log bare_blocks.json bare_stack.json train.log train/bench_train.json; do
  [ -f "$OUT/$f" ] && cp "$OUT/$f" "$REAL_OUT/"
done
tar czf "$REAL_OUT/results.tgz" -C "$OUT" . && ls "$REAL_OUT"
