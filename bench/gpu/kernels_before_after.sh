#!/usr/bin/env bash
# One H200 (device tool, kind nvidia-h200, carrying .whl), one call: the GLA kernels of the working tree against
# earlier versions of the files in BEFORE_DIR (e.g. `mkdir -p before && git show REV:dig/ops/gla_triton.py >
# before/gla_triton.py`, the same for gla_triton_kernels.py; an untracked folder travels with the working tree), in
# the same call: bench.gla_waves (each kernel's device time) at each RES:BATCHES of WAVES, and bench.ab_step for
# STEPS at each RESxBATCH of AB (empty: none), each with the earlier files first, then the working tree's.
#   BEFORE_DIR=before WAVES="256:28,32" AB=256x32 bash bench/gpu/kernels_before_after.sh
set -u
source bench/gpu/env.sh
mkdir -p /tmp/after && cp dig/ops/gla_triton.py dig/ops/gla_triton_kernels.py /tmp/after/
for side in before after; do
  if [ "$side" = before ]; then cp "${BEFORE_DIR:?BEFORE_DIR=folder with the earlier dig/ops files}"/*.py dig/ops/
  else cp /tmp/after/*.py dig/ops/; fi
  for w in ${WAVES:-256:28,32}; do
    TAIL=0 run "waves_${side}_${w%%:*}" "${WAVES_LIMIT:-120}" python3 -m bench.gla_waves --res "${w%%:*}" \
      --batches "${w#*:}" --out "/tmp/waves_${side}_${w%%:*}"
  done
  for case_ in ${AB//,/ }; do
    TAIL=4 run "ab_${side}_${case_}" "${AB_LIMIT:-150}" python3 -m bench.ab_step --steps "${STEPS:-DiG-XL/2,DiT-XL/2}" \
      --res "${case_%x*}" --batch "${case_#*x}" --rounds "${ROUNDS:-10}"
  done
done
for w in ${WAVES:-256:28,32}; do  # each kernel's µs before and after, from the two runs' gla_waves.json
  python3 - "/tmp/waves_before_${w%%:*}/gla_waves.json" "/tmp/waves_after_${w%%:*}/gla_waves.json" <<'PY'
import json, sys
before, after = ({(r["batch"], r["kernel"]): r["us"] for r in json.load(open(f))["rows"] if r["config"] == "auto"}
                 for f in sys.argv[1:])
print(f"== {json.load(open(sys.argv[1]))['rows'][0]['res']} px: batch | kernel | us before | us after")
for key in before:
    print(f"{key[0]} | {key[1]} | {before[key]:.1f} | {after.get(key, float('nan')):.1f}")
PY
done
show_failures "$OUT"/*.log
