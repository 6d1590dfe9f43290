#!/usr/bin/env bash
# Issue 12's ratios: the bare training step of DiG-XL/2 (each GLA backend / model override in BACKENDS) and
# DiT-XL/2, both compiled, side by side in one bench.run_all process on one H200, at the paper's 32 images per GPU
# and at ~32k tokens per step; then, optionally, where the step's kernel time goes (bench.profile_step) at the
# cases in PROFILES. Everything under $OUT (results.json, tables.md, logs).
#   CASES=256x32,512x32,1024x8 BACKENDS=triton,triton+mlp_recompute=false VARIANTS=graphs bash bench/gpu/model_ratios.sh
#   PROFILES="1024x8:DiG-XL/2,DiT-XL/2" CASES= bash bench/gpu/model_ratios.sh        # profiles only
# TESTS="pytest args" first runs those GPU tests (python3 -m pytest -m gpu ARGS [-k TEST_K], limit TEST_LIMIT).
set -u
source bench/gpu/env.sh
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,memory.used --format=csv | tee "$OUT/gpu.txt"
if [ -n "${TESTS:-}" ]; then  # TEST_K: pytest's -k expression
  TAIL=4 run gpu_tests "${TEST_LIMIT:-240}" python3 -m pytest -m gpu -q -p no:cacheprovider $TESTS ${TEST_K:+-k "$TEST_K"}
fi
# AB_ENV="NAME=VALUE": the ratios run twice, first with that environment variable (e.g. TORCHINDUCTOR_LAYOUT_OPTIMIZATION=1),
# then without, one process after the other
ratios() { TAIL=${TAIL_RATIOS:-40} run "ratios$1" "${RATIOS_LIMIT:-540}" python3 -m bench.run_all \
    --sections ceilings,model --variants "${VARIANTS:-graphs}" --cases "${CASES-256x32,512x32,1024x8}" \
    --gla-backends "${BACKENDS:-triton}" --budget-s "${BUDGET:-480}" --out "$OUT/ratios$1"; }
if [ -n "${CASES-256x32,512x32,1024x8}" ]; then
  if [ -n "${AB_ENV:-}" ]; then (export "${AB_ENV?}"; ratios _with_env); fi
  ratios ""
fi
# PROFILES="RESxBATCH:MODEL,MODEL;RESxBATCH:..." (models as bench.profile_step --models takes them)
IFS=';' read -ra profiles <<< "${PROFILES:-}"
for spec in "${profiles[@]}"; do
  case_=${spec%%:*}; models=${spec#*:}
  # (kernel time is the same with or without CUDA graphs; PROFILE_ARGS=--graphs for the graphed step's wall time)
  TAIL=${TAIL_PROFILE:-45} run "profile_${case_}" "${PROFILE_LIMIT:-300}" python3 -m bench.profile_step \
      ${PROFILE_ARGS:-} --models "$models" --res "${case_%x*}" --batch "${case_#*x}" --top 16
done
show_failures "$OUT"/*.log
