#!/usr/bin/env bash
# Several bench/gpu scripts side by side on one multi-GPU machine (device tool, kind nvidia-h200-x4 or -x2), each
# on its own GPUs with its own $OUT/<name>/, the wheels installed once before. One job per argument:
#   GPUS:NAME:COMMAND     e.g.  "0,1:tests:TESTS=overlap,resume bash bench/gpu/gpu_tests.sh"  "3:scan:bash bench/gpu/scan_in_kernel.sh"
# Jobs share the host's CPUs (compile workers of one can slow another's launch-bound timing a little): ratios
# that matter are measured inside one job. Each job's output goes to $OUT/<name>.txt and is printed when all end;
# its files come back as $OUT/<name>.tgz (the device tool returns only a handful of files per call).
set -u
source bench/gpu/env.sh  # installs once for all jobs; the jobs' own `source` then finds the same wheel set
nvidia-smi --query-gpu=index,name,clocks.sm,memory.used --format=csv | tee "$OUT/gpus.txt"
pids=(); names=(); t0=$SECONDS
for job in "$@"; do
  gpus=${job%%:*}; rest=${job#*:}; name=${rest%%:*}; cmd=${rest#*:}
  mkdir -p "$OUT/$name"
  ( export CUDA_VISIBLE_DEVICES=$gpus OUT=$OUT/$name; bash -c "$cmd" ) > "$OUT/$name.txt" 2>&1 &
  pids+=($!); names+=("$name")
done
for i in "${!pids[@]}"; do
  wait "${pids[$i]}"; echo "##### ${names[$i]}: rc=$? at $((SECONDS - t0))s"; tail -n "${TAIL:-25}" "$OUT/${names[$i]}.txt"
done
for name in "${names[@]}"; do tar czf "$OUT/$name.tgz" -C "$OUT" "$name" && rm -rf "${OUT:?}/$name"; done
