#!/usr/bin/env bash
# Issue 12 on one H200: the GLA kernel table (ours with the sequence split across programs, ours with one program
# per sequence and head, fla's chunk_gla, SDPA, byte floor; forward and backward apart), the GPU tests of the
# split path, then the DiG vs DiT model step at 2048 and 4096 px with each GLA backend.
set -u
source bench/gpu/env.sh
TAIL=${TAIL:-30}
run kernels 240 python3 -m bench.bench_gla_kernels --splits 2,4,8 --out "$OUT"
TAIL=6 run split_tests 150 python3 -m pytest -m gpu tests/test_gla.py -k "sequence_split or auto_choice" -x -q
run model_hires "${MODEL_LIMIT:-220}" python3 -m bench.run_all --sections ceilings,model --variants compile \
  --gla-backends triton,fla --resolutions 2048,4096 --out "$OUT/model"
