#!/usr/bin/env bash
# Issue 12's DiG-only glue on one H200 (device tool, kind nvidia-h200, carrying .whl), one call: the norm-gate
# kernels (dig/ops/norm_gate_triton.py) and the reorientation inside the compiled blocks, tested on the GPU
# (against float64; compiled vs eager in fp32), whether inductor's transposed-input gradient bug exists on CUDA
# too, the norm-gate kernels against inductor's and the byte floor, and the 256 px / 32-image step's kernel time.
set -u
REAL_OUT=$OUT; export OUT=/tmp/glue; mkdir -p "$OUT"  # the device tool returns ~8 files: the rest travel in results.tgz
source bench/gpu/env.sh
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
TAIL=6 run gpu_tests "${TEST_LIMIT:-200}" python3 -m pytest -m gpu tests/test_norm_gate.py tests/test_gpu.py \
  -k "norm or gate or compiled" -q
TAIL=5 run layout_grad 60 python3 -m bench.check_inductor_layout_grad --device cuda
TAIL=14 run norm_gate 90 python3 -m bench.bench_norm_gate --out "$OUT"
TAIL=30 run profile_256 "${PROFILE_LIMIT:-110}" python3 -m bench.profile_step --models DiG-XL/2,DiT-XL/2 --res 256 \
  --batch 32 --top 20
show_failures "$OUT"/*.log
cp "$OUT"/profile_256.log "$OUT"/norm_gate.md "$OUT"/layout_grad.log "$OUT"/gpu_tests.log "$REAL_OUT"/ 2>/dev/null
tar czf "$REAL_OUT/results.tgz" -C "$OUT" . && ls "$REAL_OUT"
