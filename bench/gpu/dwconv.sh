#!/usr/bin/env bash
# One H200 (device tool, kind nvidia-h200, carrying .whl), one call: DiG's depthwise conv, F.conv2d's backward
# against dig.ops.dwconv's flipped input gradient (bench.bench_dwconv at RESOLUTIONS), its GPU tests, then the
# DiG-XL/2 training step with each, timed against each other in rotating rounds (bench.ab_step) at each RESxBATCH of
# CASES. Under $OUT (8 files at most come back): gpu.txt, dwconv.{md,log}, tests.log, ab_<case>.md, ab.log.
#   CASES=256x32,512x32,1024x8 bash bench/gpu/dwconv.sh
set -u
source bench/gpu/env.sh
rm -f "$OUT/pip.log"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
TAIL=${TAIL_DW:-30} run dwconv "${DW_LIMIT:-150}" python3 -m bench.bench_dwconv --resolutions "${RESOLUTIONS:-256,512,1024}" \
    --out "$OUT/dwconv"
[ -f "$OUT/dwconv/dwconv.md" ] && mv "$OUT/dwconv/dwconv.md" "$OUT/dwconv.md"; rm -rf "$OUT/dwconv"
[ "${TESTS:-1}" = 1 ] && TAIL=4 run tests "${TEST_LIMIT:-150}" python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_dwconv.py
IFS=',' read -ra cases <<< "${CASES:-256x32}"
for case_ in "${cases[@]}"; do
  TAIL=${TAIL_AB:-8} run "ab_$case_" "${AB_LIMIT:-200}" python3 -m bench.ab_step \
      --steps "${STEPS:-DiG-XL/2,DiG-XL/2+dw_conv_flipped_grad=false}" --res "${case_%x*}" --batch "${case_#*x}" \
      --rounds "${ROUNDS:-12}" --out "$OUT/ab_$case_"
  [ -f "$OUT/ab_$case_/ab_step.md" ] && mv "$OUT/ab_$case_/ab_step.md" "$OUT/ab_$case_.md"; rm -rf "$OUT/ab_$case_"
  cat "$OUT/ab_$case_.log" >> "$OUT/ab.log"; rm -f "$OUT/ab_$case_.log"
done
show_failures "$OUT"/*.log
