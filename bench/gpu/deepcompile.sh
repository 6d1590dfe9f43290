#!/usr/bin/env bash
# One H200 (device tool, kind nvidia-h200, carrying .whl), one call: `dig train` DiG-XL/2 at 256 px / 32 images
# with ZeRO-3 (bf16 weights) through DeepSpeed's DeepCompile (engine.deepcompile=true: the whole model compiled
# with ZeRO-3's gathers and reductions inside the graph). Today's ZeRO-3 path (blocks compiled one by one with
# CUDA graphs, DeepSpeed's hooks gathering each block) is bench_train's
# `--set engine.zero_stage=3 --set engine.precision=bf16` (149 img/s on 2026-11-29, raw
# bench/results/2026-11-29-h200-s7-zero3.json). DeepCompile JIT-builds its C++/CUDA op with nvcc at start (the
# machine's TORCH_CUDA_ARCH_LIST holds '9.0a', which DeepSpeed's builder cannot parse: the engine now passes it
# '9.0').
# On 2026-11-29 DeepSpeed's default schedule (a second compile with prefetching after 5 steps) reached only step 3
# in 8 minutes; PREFETCH=false (the default here for ZeRO-3) compiles once (engine.deepcompile_prefetch=false).
# STAGE=1 or 2: DeepCompile's gradient-reduction pass (one compile; prefetching is ZeRO-3's).
set -u
REAL_OUT=$OUT; export OUT=/tmp/deepcompile; mkdir -p "$OUT"
source bench/gpu/env.sh
TAIL=10 run train "${TRAIN_LIMIT:-540}" python3 -m bench.bench_train --models DiG-XL/2 --resolutions 256 --gpus 1 \
  "${TRAIN_WINDOWS[@]}" --timeout "${RUN_TIMEOUT:-520}" --no-bare --set engine.zero_stage=${STAGE:-3} \
  --set engine.precision=bf16 --set engine.deepcompile=true --set model.compile=false \
  --set engine.deepcompile_prefetch=${PREFETCH:-$([ "${STAGE:-3}" = 3 ] && echo false || echo true)} \
  --out "$OUT/train"
show_failures "$OUT"/train/*.log
cp "$OUT"/train/bench_train.json "$OUT"/train.log "$REAL_OUT"/ 2>/dev/null
for f in "$OUT"/train/*.log; do grep -v '^\s*$' "$f" | grep -v "^\[rank0\]:  *^" | tail -n 80 > "$REAL_OUT/tail-$(basename "$f")"; done
ls "$REAL_OUT"
