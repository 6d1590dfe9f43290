#!/usr/bin/env bash
# Issue 12, the GLA kernel table (BENCHMARKS.md) at the shapes the 2048/4096 px run (gla_split.sh) left out, on one
# H200: 256 and 512 px, with our kernel also reading DiG's scan orders in place (is the ordered kernel what makes
# model.scan_in_kernel 22% slower at 512 px?), then 1024 px with forced splits (measured 2026-11-28: splitting does
# not pay at B·H = 144). fla's autotuning makes the whole table longer than one call, hence the pieces. Logs and
# JSON under $OUT.
set -u
source bench/gpu/env.sh
# one process per resolution: fla autotunes each shape (160 s was too short for 256 and 512 together)
run kernels_256 "${LIMIT_EACH:-150}" python3 -m bench.bench_gla_kernels --resolutions 256 --orders --out "$OUT/256"
run kernels_512 "${LIMIT_EACH:-150}" python3 -m bench.bench_gla_kernels --resolutions 512 --orders --out "$OUT/512"
run kernels_1024 "${LIMIT_1024:-130}" python3 -m bench.bench_gla_kernels --resolutions 1024 --splits 2,4 --out "$OUT/1024"
