#!/usr/bin/env bash
# One H200 (device tool, kind nvidia-h200, carrying .whl): inductor's layout optimization off for the compiled blocks
# (compile_blocks' default now) against on (TORCHINDUCTOR_LAYOUT_OPTIMIZATION=1, inductor's own default, which
# stores DiG's heads-split tensors token-innermost and copies them around the custom ops).
#   PARTS=train:   `dig train` DiG-XL/2 at 256 px / 32 images, off / on / off with the norm-gate kernels (whose gain
#                  those copies ate), one after the other (~110 s each on a fresh machine)
#   PARTS=profile: the step's kernels (bench.profile_step) off and on; then the compiled-vs-eager GPU gradient test
# Both parts in one call need ~560 s on a slow host: run them as two calls.
set -u
REAL_OUT=$OUT; export OUT=/tmp/lo; mkdir -p "$OUT"  # the device tool returns ~8 files: the rest travel in results.tgz
source bench/gpu/env.sh
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
PARTS=${PARTS:-train profile}
TRAIN=(python3 -m bench.bench_train --models DiG-XL/2 --resolutions 256 --gpus 1 --steps 24 --warmup 9 --log-every 3
       --checkpoint-at 18 --timeout 170 --no-bare)
if [[ $PARTS == *train* ]]; then
  TAIL=6 run train_off 175 "${TRAIN[@]}" --out "$OUT/train_off"
  TAIL=6 run train_on 175 env TORCHINDUCTOR_LAYOUT_OPTIMIZATION=1 "${TRAIN[@]}" --out "$OUT/train_on"
  TAIL=6 run train_off_kernels 175 "${TRAIN[@]}" --set model.overrides.norm_gate_kernel=true --out "$OUT/train_kern"
fi
if [[ $PARTS == *profile* ]]; then
  PROFILE=(python3 -m bench.profile_step --models DiG-XL/2 --res 256 --batch 32 --top 24)
  TAIL=30 run profile_off 80 "${PROFILE[@]}"
  TAIL=30 run profile_on 80 env TORCHINDUCTOR_LAYOUT_OPTIMIZATION=1 "${PROFILE[@]}"
  TAIL=4 run grad_test 60 python3 -m pytest -m gpu -q tests/test_gpu.py -k "gradients_match_eager_fp32"
fi
show_failures "$OUT"/*.log
for f in train_off/bench_train.json:train_off.json train_on/bench_train.json:train_on.json \
         train_kern/bench_train.json:train_kernels.json profile_off.log:profile_off.log profile_on.log:profile_on.log \
         grad_test.log:grad_test.log; do
  [ -f "$OUT/${f%%:*}" ] && cp "$OUT/${f%%:*}" "$REAL_OUT/${f##*:}"
done
tar czf "$REAL_OUT/results.tgz" -C "$OUT" . && ls "$REAL_OUT"
