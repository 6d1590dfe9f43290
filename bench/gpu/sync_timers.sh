#!/usr/bin/env bash
# One H200 (device tool, kind nvidia-h200, carrying .whl), one call: DeepSpeed's throughput timer, which
# synchronises the device in every engine.forward and engine.step unless a config turns it off (the trainer now
# does: engine.py), against the trainer without it, through `dig train` (ImageNet-256 recipe, 32 images/GPU):
# DiG-XL/2 as main is now, DiG-XL/2 with the timer back on (the user JSON configs/deepspeed/zero.json plus
# "timers": {"throughput": {"enabled": true}}), DiT-XL/2 as main is now. MODE=zero3: the same under ZeRO-3
# (engine.zero_stage=3, precision bf16), DiG-XL/2 only.
set -u
REAL_OUT=$OUT; export OUT=/tmp/synct; mkdir -p "$OUT"
source bench/gpu/env.sh
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
python3 - <<'PY'
import json
ds = json.load(open("configs/deepspeed/zero.json"))
ds["timers"] = {"throughput": {"enabled": True, "synchronized": True}}
json.dump(ds, open("/tmp/timers-on.json", "w"))
PY
if [ "${MODE:-zero0}" = zero3 ]; then
  MODELS=DiG-XL/2; SETS=(--set engine.zero_stage=3 --set engine.precision=bf16)
else
  MODELS=DiG-XL/2,DiT-XL/2; SETS=()
fi
TAIL=10 run train "${LIMIT:-420}" python3 -m bench.bench_train --models "$MODELS" --resolutions "${RES:-256}" --gpus 1 \
  "${TRAIN_WINDOWS[@]}" --no-bare --timeout 170 "${SETS[@]}" \
  --extra "timers-on:engine.deepspeed_config=/tmp/timers-on.json" --out "$OUT/train"
show_failures "$OUT"/*.log "$OUT"/train/*.log
cp "$OUT"/train/bench_train.json "$REAL_OUT"/train.json 2>/dev/null; cp "$OUT"/train.log "$REAL_OUT"/ 2>/dev/null
tar czf "$REAL_OUT/results.tgz" -C "$OUT" . && ls "$REAL_OUT"
