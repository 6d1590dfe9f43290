#!/usr/bin/env bash
# Issue 12, the encoder table (BENCHMARKS.md "Encoder settings"), on one H200 (device tool, kind nvidia-h200):
# the pipeline's bare encoder stage (LatentEncoder.encode_images: upload, scale, VAE encode of image + mirror,
# fp16 storage, download) at 256 px with the sd-vae-ft-ema architecture (random weights), every setting of
# `bench_pipeline.py --sweep` in one process, each row against a strict fp32 encode (TF32 off) of the same images;
# then the encoder's and its GroupNorm kernels' GPU tests. Rows are printed and written to $OUT/encoder_bench.json as each one finishes, so a
# run cut short by the time limit keeps what it measured (the compiled rows come last among the batch-64 rows).
# .whl/ needs the usual set (../shared/gpu/prepare-wheels.sh) plus diffusers and what it imports:
#   bash bench/gpu/prepare-encoder-wheels.sh
set -u
source bench/gpu/env.sh
python3 -c "from diffusers import AutoencoderKL" > "$OUT/diffusers_import.log" 2>&1 || {
    echo "diffusers does not import (see the wheel list at the top of this script):"; tail -3 "$OUT/diffusers_import.log"
    exit 1; }
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,memory.used --format=csv | tee "$OUT/gpu.txt"
t0=$SECONDS
# SETTINGS=a,b,... times those settings instead of the sweep (e.g. SETTINGS=bf16+cl+compile,fp16+cl+compile,bf16+compile);
# PROFILE=1 adds where each setting's kernel time goes (bench_pipeline.py --profile); GN_OPTIONS="TILE=2048;…" sets
# the fused GroupNorm kernels' launch options for every row (bench_pipeline.py --gn-options)
if [ -n "${SETTINGS:-}" ]; then which=(--settings "$SETTINGS"); else which=(--sweep); fi
timeout "${LIMIT:-430}" python3 bench/bench_pipeline.py --only encoder "${which[@]}" --device cuda --vae config:sd \
    --resolution 256 --images "${IMAGES:-1024}" --batch 64 --repeat 3 ${PROFILE:+--profile} --gn-options "${GN_OPTIONS:-default}" --out "$OUT" \
    > "$OUT/encoder_sweep.log" 2>&1
echo "sweep rc=$? $((SECONDS - t0))s"
grep -v '^\[bench_pipeline\] {' "$OUT/encoder_sweep.log" | grep -v "^\s*$" | tail -16
grep -m3 -i "error\|recompil\|graph break" "$OUT/encoder_sweep.log" | cut -c1-300
timeout "${TEST_LIMIT:-180}" python3 -m pytest -m gpu tests/test_encoder.py tests/test_group_norm.py -q \
    > "$OUT/gpu_tests.log" 2>&1
echo "encoder gpu tests rc=$?"; tail -3 "$OUT/gpu_tests.log"
