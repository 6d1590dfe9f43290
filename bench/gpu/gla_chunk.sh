#!/usr/bin/env bash
# One H200 (device tool, kind nvidia-h200, carrying .whl), one call: each GLA kernel's chunk of tokens (16, the
# module's CHUNK, against 32 and 64 at 1-4 warps; bench.tune_gla_launch's c<chunk> option sets) at 32 images per GPU,
# then the first GPU run of bench.ab_train: `dig train`'s step with the SwiGLU operator, without it, and DiT-XL/2,
# in rotating rounds in one process (three XL trainers, ~60 GiB).
#   bash bench/gpu/gla_chunk.sh
set -u
source bench/gpu/env.sh
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
TAIL=12 run tune "${TUNE_LIMIT:-220}" python3 -m bench.tune_gla_launch --cases "${CASES:-256x32,512x32}" \
  --configs "${CONFIGS:-auto,w1c32,w2c32,w4c32,w4c64}" --rounds "${TUNE_ROUNDS:-10}" --out "$OUT"
TAIL=8 run ab_train "${AB_LIMIT:-330}" python3 -m bench.ab_train --runs "${RUNS:-DiG-XL/2,DiG-XL/2+mlp_kernel=false,DiT-XL/2}" \
  --res 256 --batch 32 --rounds "${ROUNDS:-8}" --out "$OUT"
show_failures "$OUT"/*.log
