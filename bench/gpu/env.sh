# Sourced by the bench/gpu scripts (device tool runs, carrying .whl): $OUT, the carried wheels installed into
# /tmp/site, the environment every script needs, and `run NAME LIMIT CMD...` (CMD's output to $OUT/NAME.log under a
# time limit, then its rc, time and last $TAIL lines),
# and `show_failures`. The install is skipped only when /tmp/site already holds this
# exact wheel set: a machine still warm from an earlier call may hold other versions (it once kept a
# huggingface_hub that broke diffusers), and scripts run side by side by parallel.sh share one install.
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
_wheels=$(ls .whl | sha1sum | cut -c1-40)
if [ "$(cat /tmp/site/.installed 2>/dev/null)" != "$_wheels" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    > "$OUT/pip.log" 2>&1 || { grep -v '^WARNING: Target directory' "$OUT/pip.log" | tail -n 5; exit 1; }
  echo "$_wheels" > /tmp/site/.installed
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TORCH_EXTENSIONS_DIR=/tmp/tex TRITON_CACHE_DIR=/tmp/tc \
    TORCHINDUCTOR_CACHE_DIR=/tmp/ic
# show_failures LOG...: the last lines of every given log that holds a Python traceback (missing files skipped).
show_failures() { local f; for f in "$@"; do
  [ -f "$f" ] && grep -q Traceback "$f" && { echo "== failed: $f"; grep -v '^\s*$' "$f" | tail -n 12; }; done; return 0; }
run() { local name=$1 limit=$2; shift 2; echo "=== $name: $*"; local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; echo "rc=$? ${name} $((SECONDS - t0))s"; tail -n "${TAIL:-14}" "$OUT/$name.log"; }
# bench.bench_trainer_overhead's arguments for the ImageNet-256 recipe's engine (ZeRO-0, amp, blocks compiled with
# CUDA graphs, no clipping) in both loops, DiG-XL/2 at 32 images
RECIPE_STEP=(python3 -m bench.bench_trainer_overhead --model DiG-XL/2 --batch 32 --zero-stage 0
             --bare-compile-mode reduce-overhead --set model.compile=true --set model.compile_mode=reduce-overhead
             --set engine.precision=amp --set optim.grad_clip=0)
# bench.bench_train's window of the issue tables: 24 steps, 9 of warm-up, a metric window every 3, a checkpoint at 18
TRAIN_WINDOWS=(--steps 24 --warmup 9 --log-every 3 --checkpoint-at 18)
