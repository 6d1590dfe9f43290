#!/usr/bin/env bash
# One H200 (device tool, kind nvidia-h200, carrying .whl), one call: DeepSpeed's throughput timer, which
# synchronises the device in every engine.forward and engine.step unless a config turns it off (the trainer now
# does: engine.py), against the trainer without it, through `dig train` (ImageNet-256 recipe, 32 images/GPU):
# DiG-XL/2 as main is now, DiG-XL/2 with the timer back on (the user JSON configs/deepspeed/zero.json plus
# "timers": {"throughput": {"enabled": true}}), DiT-XL/2 as main is now. gpu_idle.sh's train part.
python3 - <<'PY'
import json
ds = json.load(open("configs/deepspeed/zero.json"))
ds["timers"] = {"throughput": {"enabled": True, "synchronized": True}}
json.dump(ds, open("/tmp/timers-on.json", "w"))
PY
EXTRA="timers-on:engine.deepspeed_config=/tmp/timers-on.json" IDLE=0 SCRATCH=/tmp/synct \
  TRAIN_LIMIT=${TRAIN_LIMIT:-420} TRAIN_TAIL=10 exec bash bench/gpu/gpu_idle.sh
