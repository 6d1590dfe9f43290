#!/usr/bin/env bash
# Issue 11, second look on one H200: CUDA graphs (compile_mode=reduce-overhead) inside `dig train`'s step under
# each engine setting, DiG-XL/2 at 256 px with 32 images per GPU; then the GPU shape-safety test.
# (Run on 2026-11-28 with the ZeRO-3 persistence thresholds in a separate JSON; configs/deepspeed/zero.json has them now.)
set -u
source bench/gpu/env.sh
B="python3 -m bench.bench_trainer_overhead --model DiG-XL/2 --resolution 256 --batch 32 --steps 10 --warmup 5 --out $OUT --trainer-only --compile --profile --set model.compile_mode=reduce-overhead"
P=engine.deepspeed_config=configs/deepspeed/zero.json
run() { local name=$1; shift; echo "=== $name: $*"; local t0=$SECONDS
  timeout "${LIMIT:-140}" "$@" > "$OUT/$name.log" 2>&1; echo "rc=$? ${name} $((SECONDS - t0))s"
  grep -A16 "timed steps" "$OUT/$name.log" | grep -v "^\s*$\|bare model\|overhead of" | head -16
  grep -m3 -i "error\|re-record\|rerecord\|skipping cudagraph" "$OUT/$name.log" | cut -c1-300; }
run z0_amp_cg  $B --zero-stage 0 --set engine.precision=amp
run z3p_cg     $B --zero-stage 3 --set $P
run z2_cg      $B --zero-stage 2
run z3p_amp_cg $B --zero-stage 3 --set $P --set engine.precision=amp
PYTHONPATH=bench/triton_first_config:$PYTHONPATH LIMIT=150 run gpu_test_shapes python3 -m pytest -m gpu tests/test_gpu.py -k any_batch -x -q
tail -4 "$OUT/gpu_test_shapes.log"
