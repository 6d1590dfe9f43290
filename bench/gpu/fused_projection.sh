#!/usr/bin/env bash
# Issue 12 on one H200 (device tool, kind nvidia-h200, carrying .whl), one call: DiG's GLA layer with its five
# input projections as one GEMM against the layer as it was (profile_step's +unfused), kernel time and wall time
# of the 256 px / 32-image step side by side with DiT-XL/2; the model's GPU tests (float64 agreement, compiled vs
# eager); then `dig train` on one GPU with the trainer/bare ratio.
set -u
source bench/gpu/env.sh
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
TAIL=26 run profile_256 "${PROFILE_LIMIT:-150}" python3 -m bench.profile_step \
  --models DiG-XL/2,DiG-XL/2+unfused,DiT-XL/2 --res 256 --batch 32 --top 8
TAIL=4 run model_gpu_tests "${TEST_LIMIT:-120}" python3 -m pytest -m gpu tests/test_gpu.py -q \
  -k "not any_batch and not training_loss"
[ "${TRAIN_LIMIT:-170}" -gt 0 ] && TAIL=12 run train "${TRAIN_LIMIT:-170}" python3 -m bench.bench_train \
  --models DiG-XL/2 --resolutions 256 --gpus 1 --steps 24 --warmup 9 --log-every 3 --checkpoint-at 18 \
  --bare-mode reduce-overhead --timeout 160 --out "$OUT/train"
cp "$OUT"/train/bench_train.json "$OUT"/ 2>/dev/null
tar czf /tmp/results.tgz -C "$OUT" . && mv /tmp/results.tgz "$OUT/" && rm -rf "$OUT/train" && ls "$OUT"
