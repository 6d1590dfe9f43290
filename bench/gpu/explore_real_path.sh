#!/usr/bin/env bash
# Issue 11 exploration on one H200 (device tool): where `dig train`'s DiG-XL/2 step at 32 images/GPU loses time.
# Each line is one process; results (JSON + logs) go to $OUT. Run from the repo root with the wheels in .whl/.
# (Run on 2026-11-28 with the ZeRO-3 persistence thresholds in a separate JSON; configs/deepspeed/zero.json has them now.)
set -u
source bench/gpu/env.sh
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,memory.used --format=csv | tee "$OUT/gpu.txt"
B="python3 -m bench.bench_trainer_overhead --model DiG-XL/2 --resolution 256 --batch 32 --steps 10 --warmup 4 --out $OUT"
P=configs/deepspeed/zero.json
run() { local name=$1; shift; echo "=== $name: $*"; local t0=$SECONDS
  timeout "${LIMIT:-150}" "$@" > "$OUT/$name.log" 2>&1; echo "rc=$? ${name} $((SECONDS - t0))s"
  grep -A14 "timed steps" "$OUT/$name.log" | grep -v "^\s*$" | head -28; }
run z3_persist_compile $B --zero-stage 3 --compile --profile --set engine.deepspeed_config=$P
run z3_persist_eager   $B --zero-stage 3 --profile --set engine.deepspeed_config=$P
run bare_cudagraphs    $B --bare-only --bare-compile-mode reduce-overhead --profile
LIMIT=120 run profile_256_b32 python3 -m bench.profile_step --models DiG-XL/2,DiT-XL/2 --res 256 --batch 32 --top 25
grep -B2 -A30 "GPU kernel time" "$OUT/profile_256_b32.log" | head -45
run z3_default_compile $B --zero-stage 3 --compile --profile
