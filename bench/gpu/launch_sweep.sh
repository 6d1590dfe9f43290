#!/usr/bin/env bash
# Issue 12 on one H200 (device tool, kind nvidia-h200, carrying .whl), one call: the GLA kernels' launch options
# (bench.tune_gla_launch: registers per program decide how many of a layer's 576 programs an SM holds at 32
# images per GPU), then where the 57 ms that model.scan_in_kernel added to the 512 px step went (profile), then the
# encoder's compiled settings (the 750 images/s).
set -u
source bench/gpu/env.sh
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
TAIL=24 run launch "${LAUNCH_LIMIT:-260}" python3 -m bench.tune_gla_launch ${CONFIGS:+--configs "$CONFIGS"} \
  ${CASES:+--cases "$CASES"} --out "$OUT"
[ "${PROFILE_LIMIT:-150}" -gt 0 ] && TAIL=40 run profile_scan "${PROFILE_LIMIT:-150}" python3 -m bench.profile_step \
  --models DiG-XL/2,DiG-XL/2+scan --res 512 --batch 32 --top 25
[ "${ENCODER_LIMIT:-150}" -gt 0 ] && LIMIT=${ENCODER_LIMIT:-150} TEST_LIMIT=1 \
  SETTINGS=${ENCODER_SETTINGS:-fp16+cl+compile,bf16+compile} bash bench/gpu/encoder_sweep.sh
tar czf /tmp/results.tgz -C "$OUT" . && mv /tmp/results.tgz "$OUT/" && ls "$OUT"
