#!/usr/bin/env bash
# Issue 12, 256 px / 32: does packing the forget gate's 16-column projection into the q | k | v | gate GEMM pay
# (bench.forget_gate_gemms, the GEMMs alone), and where DiG-XL/2's step goes against DiT-XL/2's now
# (bench.profile_step). PROFILE= skips the profile. Logs under $OUT.
set -u
source bench/gpu/env.sh
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
TAIL=20 run gemms 150 python3 -m bench.forget_gate_gemms --tokens "${TOKENS:-8192,32768}"
CASE=${PROFILE-256x32}
if [ -n "$CASE" ]; then
  TAIL=60 run "profile_$CASE" 330 python3 -m bench.profile_step --models "${MODELS:-DiG-XL/2,DiT-XL/2}" \
      --res "${CASE%x*}" --batch "${CASE#*x}" --top 30
fi
show_failures "$OUT"/*.log
