#!/usr/bin/env bash
# One H200 (device tool, kind nvidia-h200, carrying .whl), one call: the depthwise conv's forward and backward
# variants side by side (bench.bench_dwconv at RESOLUTIONS, with the --settings sets of SETTINGS), its GPU tests, then
# for each FORWARD/BACKWARD pair of COMBOS the DiG-XL/2 training step with the operator (model.overrides
# .dw_conv_kernel=true, DIG_DWCONV_FORWARD / DIG_DWCONV_BACKWARD set) against F.conv2d, in rotating rounds
# (bench.ab_step) at each RESxBATCH of CASES. Outputs under $OUT: dwconv.{md,log}, tests.log, ab_<combo>_<case>.{md,log}.
#   COMBOS=cudnn/cudnn_dx CASES=256x32 bash bench/gpu/dwconv_ab.sh
set -u
source bench/gpu/env.sh
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
if [ -n "${SETTINGS+x}" ]; then
  TAIL=${TAIL_DW:-40} run dwconv "${DW_LIMIT:-150}" python3 -m bench.bench_dwconv --resolutions "${RESOLUTIONS:-256,512,1024}" \
      --settings "$SETTINGS" --out "$OUT/dwconv"
  [ -f "$OUT/dwconv/dwconv.md" ] && mv "$OUT/dwconv/dwconv.md" "$OUT/dwconv.md"; rm -rf "$OUT/dwconv"
fi
[ "${TESTS:-1}" = 1 ] && TAIL=4 run tests "${TEST_LIMIT:-150}" python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_dwconv.py
IFS=',' read -ra combos <<< "${COMBOS:-}"
IFS=',' read -ra cases <<< "${CASES:-256x32}"
for combo in "${combos[@]}"; do
  for case_ in "${cases[@]}"; do
    name="ab_${combo//\//-}_${case_}"
    DIG_DWCONV_FORWARD=${combo%/*} DIG_DWCONV_BACKWARD=${combo#*/} TAIL=${TAIL_AB:-8} run "$name" "${AB_LIMIT:-240}" \
        python3 -m bench.ab_step --steps "DiG-XL/2,DiG-XL/2+dw_conv_kernel=true" --res "${case_%x*}" \
        --batch "${case_#*x}" --rounds "${ROUNDS:-12}" --out "$OUT/$name"
    [ -f "$OUT/$name/ab_step.md" ] && mv "$OUT/$name/ab_step.md" "$OUT/$name.md"; rm -rf "$OUT/$name"
  done
done
show_failures "$OUT"/*.log
