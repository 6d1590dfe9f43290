#!/usr/bin/env bash
# Issue 12 on one H200: the GLA kernel table (ours with the sequence split across programs, ours with one program
# per sequence and head, fla's chunk_gla, SDPA, byte floor; forward and backward apart), the GPU tests of the
# split path, then the DiG vs DiT model step at 2048 and 4096 px with each GLA backend.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
[ -f /tmp/site/.installed ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TORCH_EXTENSIONS_DIR=/tmp/tex TRITON_CACHE_DIR=/tmp/tc
run() { local name=$1 limit=$2; shift 2; echo "=== $name: $*"; local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; echo "rc=$? ${name} $((SECONDS - t0))s"; tail -n "${TAIL:-30}" "$OUT/$name.log"; }
run kernels 240 python3 -m bench.bench_gla_kernels --splits 2,4,8 --out "$OUT"
TAIL=6 run split_tests 150 python3 -m pytest -m gpu tests/test_gla.py -k "sequence_split or auto_choice" -x -q
run model_hires "${MODEL_LIMIT:-220}" python3 -m bench.run_all --sections ceilings,model --variants compile \
  --gla-backends triton,fla --resolutions 2048,4096 --out "$OUT/model"
