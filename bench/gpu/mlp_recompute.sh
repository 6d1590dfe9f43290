#!/usr/bin/env bash
# One H200 (device tool, kind nvidia-h200, carrying .whl), one call: DiG-XL/2 with each SwiGLU recomputing
# silu(gate) * up in the backward instead of saving it (model.overrides.mlp_recompute=true; 13 % fewer saved
# activation bytes per token and block in the compiled model, 0.99x DiT-XL/2's: `python -m bench.memory_breakdown`,
# CPU) against main's default through `dig train` at 256 px / 32 images (speed, peak memory), then at 512 px with
# DiT-XL/2 beside it (issue 12: peak memory <= DiT's), and what the compiled model saves, on the GPU.
set -u
REAL_OUT=$OUT; export OUT=/tmp/mlprc; mkdir -p "$OUT"
source bench/gpu/env.sh
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
COMMON=(--gpus 1 "${TRAIN_WINDOWS[@]}" --no-bare)
TAIL=10 run r256 "${R256_LIMIT:-250}" python3 -m bench.bench_train --models DiG-XL/2 --resolutions 256 "${COMMON[@]}" \
  --timeout 150 --extra "mlp-recompute:model.overrides.mlp_recompute=true" --out "$OUT/r256"
TAIL=10 run r512 "${R512_LIMIT:-330}" python3 -m bench.bench_train --models DiG-XL/2,DiT-XL/2 --resolutions 512 \
  "${COMMON[@]}" --timeout 170 --extra "mlp-recompute:model.overrides.mlp_recompute=true" --out "$OUT/r512"
TAIL=20 run saved "${SAVED_LIMIT:-200}" python3 -m bench.memory_breakdown --run DiT-XL/2 --run DiG-XL/2 \
  --run DiG-XL/2:mlp_recompute=true --resolution 256 --batch 32 --json "$OUT/saved.json"
show_failures "$OUT"/*.log "$OUT"/r256/*.log "$OUT"/r512/*.log
cp "$OUT"/r256/bench_train.json "$REAL_OUT"/r256.json 2>/dev/null; cp "$OUT"/r512/bench_train.json "$REAL_OUT"/r512.json 2>/dev/null
cp "$OUT"/saved.json "$OUT"/r256.log "$OUT"/r512.log "$OUT"/saved.log "$REAL_OUT"/ 2>/dev/null
tar czf "$REAL_OUT/results.tgz" -C "$OUT" . && ls "$REAL_OUT"
