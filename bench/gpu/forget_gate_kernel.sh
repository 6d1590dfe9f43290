#!/usr/bin/env bash
# One H200 (device tool, kind nvidia-h200, carrying .whl), one call: the DiG-XL/2 step with the forget-gate kernels
# (model.overrides.forget_gate_kernel, the default) against the GEMM and logsigmoid (forget_gate_kernel=false) at
# 256 px / 32 (bench.ab_step, rotating rounds in one process), then the GPU tests of the kernels and of DiG with
# them (against float64, compiled against eager).
#   bash bench/gpu/forget_gate_kernel.sh
set -u
source bench/gpu/env.sh
STEPS="DiG-XL/2,DiG-XL/2+forget_gate_kernel=false" CASES=${CASES:-256x32} ROUNDS=${ROUNDS:-10} AB_LIMIT=${AB_LIMIT:-130} \
  bash bench/gpu/ab_step.sh
TAIL=6 PYTHONPATH=bench/triton_first_config:$PYTHONPATH run tests "${TESTS_LIMIT:-110}" python3 -m pytest -m gpu -q \
  -p no:cacheprovider tests/test_low_rank_gate.py tests/test_swiglu.py tests/test_gpu.py \
  -k "low_rank_gate or swiglu or kernels_match_float64_torch_backend or compiled_blocks"
