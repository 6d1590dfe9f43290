#!/usr/bin/env bash
# Issue 12: DiG-XL/2 with its forget gate packed into the input GEMM (model.overrides.packed_forget_gate, the
# default) against the gate apart and against DiT-XL/2, on one H200 in one call: the GPU tests of the packed
# operators and compiled blocks, bench.ab_step at CASES (rotating rounds), then where the step's kernel time goes
# (bench.profile_step) at PROFILE. Logs and tables under $OUT.
#   bash bench/gpu/forget_gate_ab.sh                   # CASES=256x32,512x32 PROFILE=256x32
set -u
source bench/gpu/env.sh
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
TAIL=6 PYTHONPATH=bench/triton_first_config:$PYTHONPATH run gpu_tests 200 python3 -m pytest -m gpu -q \
    -p no:cacheprovider tests/test_gla.py tests/test_gpu.py -k "gated_packed or compiled_blocks or dig_kernels_match"
IFS=',' read -ra cases <<< "${CASES-256x32,512x32}"
for case_ in "${cases[@]}"; do
  TAIL=8 run "ab_${case_}" 200 python3 -m bench.ab_step \
      --steps "DiG-XL/2,DiG-XL/2+packed_forget_gate=false,DiT-XL/2" --res "${case_%x*}" --batch "${case_#*x}" \
      --rounds "${ROUNDS:-10}" --out "$OUT/ab_${case_}"
  for f in "$OUT/ab_${case_}"/ab_step.*; do [ -f "$f" ] && mv "$f" "$OUT/ab_${case_}.${f##*.}"; done
  rmdir "$OUT/ab_${case_}" 2>/dev/null
done
CASE=${PROFILE-256x32}
if [ -n "$CASE" ]; then
  TAIL=16 run "profile_$CASE" 150 python3 -m bench.profile_step --models "DiG-XL/2,DiT-XL/2" \
      --res "${CASE%x*}" --batch "${CASE#*x}" --top 30
fi
show_failures "$OUT"/*.log
