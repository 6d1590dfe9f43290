#!/usr/bin/env bash
# One H200 (device tool, kind nvidia-h200, carrying .whl), one call: `dig train` DiG-XL/2 at 256 px / 32 images with
# the diffusion loss compiled (model.compile_loss, default) and eager, one after the other; then where the step
# still leaves the GPU idle (bench.bench_trainer_overhead --gpu-idle, bare graphed step and trainer, both with the
# compiled loss).
set -u
REAL_OUT=$OUT; export OUT=/tmp/closs; mkdir -p "$OUT"
source bench/gpu/env.sh
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
TAIL=8 run train "${TRAIN_LIMIT:-250}" python3 -m bench.bench_train --models DiG-XL/2 --resolutions 256 --gpus 1 \
  --steps 24 --warmup 9 --log-every 3 --checkpoint-at 18 --timeout 120 --no-bare \
  --extra "eager-loss:model.compile_loss=false" --out "$OUT/train"
TAIL=45 run idle "${IDLE_LIMIT:-150}" python3 -m bench.bench_trainer_overhead --model DiG-XL/2 --batch 32 \
  --zero-stage 0 --bare-compile-mode reduce-overhead --set model.compile=true --set model.compile_mode=reduce-overhead \
  --set engine.precision=amp --set optim.grad_clip=0 --steps 10 --warmup 8 --gpu-idle 4 --log-every 100 \
  --out "$OUT/idle"
show_failures "$OUT"/*.log
cp "$OUT"/train/bench_train.json "$OUT"/idle.log "$OUT"/train.log "$REAL_OUT"/ 2>/dev/null
cp "$OUT"/idle/*.json "$REAL_OUT"/trainer_overhead.json 2>/dev/null
tar czf "$REAL_OUT/results.tgz" -C "$OUT" . && ls "$REAL_OUT"
