#!/usr/bin/env bash
# One nvidia-h200-x2 call (device tool, carrying .whl), two jobs side by side (bench/gpu/parallel.sh):
#   GPU 0 "steps": the GPU tests of the packed projections' operator and of what it touches, then the DiG-XL/2 step
#     with packed projections (the default) against four GEMMs and against DiT-XL/2 at 256 px / 32, and DiG against
#     DiT at 1024 px / 8 (bench.ab_step, rotating rounds in one process);
#   GPU 1 "train": `dig train` at 256 px / 32 on one GPU, DiG-XL/2 (default), DiT-XL/2 and DiG-XL/2 with four
#     GEMMs (bench.bench_train), then DiG against DiT at 512 px / 32 (bench.ab_step).
#   bash bench/gpu/packed_projections.sh
set -u
steps='source bench/gpu/env.sh
TAIL=4 run tests 220 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_gla.py tests/test_norm_gate.py \
  tests/test_dwconv.py tests/test_gpu.py -k "gated or norm_gate or busy or dig_blocks or compiled_blocks"
STEPS="DiG-XL/2,DiG-XL/2+packed_projections=false,DiT-XL/2" CASES=256x32 ROUNDS=12 AB_LIMIT=200 \
  bash bench/gpu/ab_step.sh
STEPS="DiG-XL/2,DiT-XL/2" CASES=1024x8 ROUNDS=10 AB_LIMIT=150 bash bench/gpu/ab_step.sh'
train='source bench/gpu/env.sh
TAIL=12 run train 330 python3 -m bench.bench_train --models DiG-XL/2,DiT-XL/2 --resolutions 256 --gpus 1 \
  --steps 24 --warmup 9 --log-every 3 --checkpoint-at 18 --timeout 160 --no-bare \
  --extra "four_gemms:model.overrides.packed_projections=false" --out "$OUT/bt"
cp "$OUT/bt/bench_train.json" "$OUT/" 2>/dev/null; rm -rf "$OUT/bt"
STEPS="DiG-XL/2,DiT-XL/2" CASES=512x32 ROUNDS=10 AB_LIMIT=150 bash bench/gpu/ab_step.sh'
bash bench/gpu/parallel.sh "0:steps:$steps" "1:train:$train"
