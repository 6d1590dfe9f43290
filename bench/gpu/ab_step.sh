#!/usr/bin/env bash
# One H200 (device tool, kind nvidia-h200, carrying .whl), one call: bench.ab_step at each RESxBATCH of CASES, the
# training steps of STEPS (comma list, the first is the base) timed against each other in rotating rounds, one
# process per case; tables and raw times under $OUT (ab_<case>.{json,md,log}: two cases per call, since the device
# tool returns 8 files). Two DiG-XL/2 steps held at once with CUDA graphs take ~90 GiB at 1024 px / 8.
#   STEPS="DiG-XL/2,DiG-XL/2+dw_conv_flipped_grad=false" CASES=1024x8,256x32 bash bench/gpu/ab_step.sh
set -u
source bench/gpu/env.sh
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
IFS=',' read -ra cases <<< "${CASES:-1024x8,256x32}"
for case_ in "${cases[@]}"; do
  TAIL=${TAIL_AB:-8} run "ab_${case_}" "${AB_LIMIT:-280}" python3 -m bench.ab_step --steps "${STEPS:?STEPS=MODEL,MODEL+KEY=VALUE}" \
      --res "${case_%x*}" --batch "${case_#*x}" --rounds "${ROUNDS:-15}" --out "$OUT/ab_${case_}"
  for f in "$OUT/ab_${case_}"/ab_step.*; do [ -f "$f" ] && mv "$f" "$OUT/ab_${case_}.${f##*.}"; done
  rmdir "$OUT/ab_${case_}" 2>/dev/null
done
show_failures "$OUT"/*.log
