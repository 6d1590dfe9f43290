#!/usr/bin/env bash
# The GPU-only tests that issues 11 and 14 still need recorded, on a 2- or 4-GPU machine (kind nvidia-h200-x2 or
# -x4), each with its own time limit: compiled DiG on any batch and resolution in one process (compiles for minutes
# on a fresh machine), the overlapped gradient all-reduce over NCCL, and resuming on another GPU count (all → half
# → all), and the EMA on its own CUDA stream (same bits as on the main stream, ZeRO-0 and ZeRO-3, every side-stream
# update held back behind a sleep). Logs under $OUT.
set -u
source bench/gpu/env.sh
TAIL=${TAIL:-3}
TESTS=${TESTS:-overlap,resume,shape,ema}  # a subset, e.g. TESTS=shape on one GPU beside the others (bench/gpu/parallel.sh)
[[ ,$TESTS, == *,overlap,* ]] && run overlap_allreduce 150 python3 -m pytest -m gpu tests/test_grad_allreduce.py -x -q
[[ ,$TESTS, == *,resume,* ]] && \
  run resume_other_gpu_count 330 python3 -m pytest -m gpu tests/test_train_gpu.py -k another_gpu_count -x -q -s
first_gpu=${CUDA_VISIBLE_DEVICES:-0}; first_gpu=${first_gpu%%,*}
[[ ,$TESTS, == *,ema,* ]] && CUDA_VISIBLE_DEVICES=$first_gpu \
  run ema_side_stream "${EMA_LIMIT:-300}" python3 -m pytest -m gpu tests/test_train_gpu.py -k ema_on_its_own -x -q
[[ ,$TESTS, == *,shape,* ]] && CUDA_VISIBLE_DEVICES=$first_gpu PYTHONPATH=bench/triton_first_config:$PYTHONPATH \
  run compiled_any_shape "${SHAPE_LIMIT:-300}" python3 -m pytest -m gpu tests/test_gpu.py -k any_batch -x -q
true
