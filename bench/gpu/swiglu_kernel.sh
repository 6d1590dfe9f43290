#!/usr/bin/env bash
# One H200 (device tool, kind nvidia-h200, carrying .whl), one call: the SwiGLU operator's GPU tests and the GPU
# tests of what it touches (compiled DiG blocks), then the DiG-XL/2 step with the operator (model.overrides.mlp_kernel,
# the default) against activation checkpointing of the product (mlp_kernel=false) and against DiT-XL/2 at 256 px /
# 32, and the first two at 512 px / 32 (bench.ab_step, rotating rounds in one process).
#   bash bench/gpu/swiglu_kernel.sh
set -u
source bench/gpu/env.sh
TAIL=6 PYTHONPATH=bench/triton_first_config:$PYTHONPATH run tests "${TESTS_LIMIT:-200}" python3 -m pytest -m gpu -q \
  -p no:cacheprovider tests/test_swiglu.py tests/test_gpu.py tests/test_gla.py \
  -k "swiglu or compiled_blocks or gated or column_slices"
STEPS="DiG-XL/2,DiG-XL/2+mlp_kernel=false,DiT-XL/2" CASES=256x32 ROUNDS=${ROUNDS:-12} AB_LIMIT=170 \
  bash bench/gpu/ab_step.sh
STEPS="DiG-XL/2,DiG-XL/2+mlp_kernel=false" CASES=512x32 ROUNDS=${ROUNDS:-8} AB_LIMIT=150 bash bench/gpu/ab_step.sh
