#!/usr/bin/env bash
# Issue 12 on one H200 (device tool, kind nvidia-h200, carrying .whl), one call: the GLA kernels with the busy-GPU
# launch options (gla_triton.LAUNCH_BUSY) measured every way in one call: the GPU kernel tests against float64
# (including a shape busy enough to take those options), each kernel under the old launch (w4) and the chosen one
# (auto) side by side, the 256 px / 32-image step's kernel time (DiG-XL/2 and DiT-XL/2), then `dig train` on one GPU.
set -u
source bench/gpu/env.sh
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
TAIL=4 run gla_gpu_tests "${TEST_LIMIT:-150}" python3 -m pytest -m gpu tests/test_gla.py -k "triton or busy" -q
TAIL=20 run launch_ab "${AB_LIMIT:-90}" python3 -m bench.tune_gla_launch --configs w4,auto \
  --cases 256x32,256x128,512x32,1024x8 --out "$OUT"
TAIL=14 run profile_256 "${PROFILE_LIMIT:-100}" python3 -m bench.profile_step --models DiG-XL/2,DiT-XL/2 --res 256 \
  --batch 32 --top 12
[ "${TRAIN_LIMIT:-250}" -gt 0 ] && TAIL=30 run train "${TRAIN_LIMIT:-250}" python3 -m bench.bench_train \
  --models DiG-XL/2,DiT-XL/2 --resolutions 256 --gpus 1 --steps 24 --warmup 9 --log-every 3 --checkpoint-at 18 \
  --bare-mode reduce-overhead --timeout 200 --out "$OUT/train"
cp "$OUT"/train/bench_train.json "$OUT"/ 2>/dev/null
tar czf /tmp/results.tgz -C "$OUT" . && mv /tmp/results.tgz "$OUT/" && rm -rf "$OUT/train" && ls "$OUT"
