#!/usr/bin/env bash
# One H200 (device tool, kind nvidia-h200, carrying .whl), one call: bench.gla_waves, each GLA kernel's time against
# its number of programs (batch x 18 heads) around the point where they outnumber the slots of one round, at 256 and
# 512 px, with the module's launch (auto) and 4 warps everywhere (w4).
#   bash bench/gpu/gla_waves.sh
set -u
source bench/gpu/env.sh
TAIL=40 run waves256 "${LIMIT:-200}" python3 -m bench.gla_waves --res 256 --batches "${BATCHES256:-24,28,29,30,32,36}" \
  --configs "${CONFIGS:-auto,w4}" --out "$OUT/w256"
TAIL=30 run waves512 "${LIMIT:-200}" python3 -m bench.gla_waves --res 512 --batches "${BATCHES512:-28,29,30,32}" \
  --configs "${CONFIGS:-auto,w4}" --out "$OUT/w512"
for d in w256 w512; do for f in "$OUT/$d"/*; do [ -f "$f" ] && mv "$f" "$OUT/$d-${f##*/}"; done; rmdir "$OUT/$d" 2>/dev/null; done
show_failures "$OUT"/*.log
