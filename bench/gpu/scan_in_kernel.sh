#!/usr/bin/env bash
# Issue 12 on one H200 (device tool, kind nvidia-h200, carrying .whl): DiG's scan directions read in place by the
# GLA kernels (model.scan_in_kernel) against the reorienting copies between blocks. The GPU tests of the token
# order, then the compiled DiG-XL/2 step with both (and DiT-XL/2) at 256 and 512 px, then `dig train` at 256 px,
# 32 images, both ways side by side.
set -u
source bench/gpu/env.sh
TAIL=3 run token_order_tests 120 python3 -m pytest -m gpu tests/test_gla.py -k token_order -x -q
run model "${MODEL_LIMIT:-240}" python3 -m bench.run_all --sections ceilings,model --variants compile --gla-backends triton,triton+scan \
  --resolutions 256,512 --out "$OUT/model"
[ "${TRAIN_LIMIT:-200}" -gt 0 ] && run train "${TRAIN_LIMIT:-200}" python3 -m bench.bench_train --models DiG-XL/2 --resolutions 256 --gpus 1 --steps 24 \
  --warmup 9 --log-every 3 --checkpoint-at 18 --bare-mode reduce-overhead \
  --extra "scan-in-kernel@1:model.scan_in_kernel=true" --out "$OUT/train"
