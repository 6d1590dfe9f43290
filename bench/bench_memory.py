"""GPU memory of a `dig train` step and the largest micro-batch per GPU that fits, per model and resolution.

What runs: the real training step of `dig train` (`Trainer.run_step`: DeepSpeed engine, diffusion loss, gradient
norm, AdamW step, EMA update) built from the run config users start from, configs/train/dig-xl2-imagenet256.yaml
(ZeRO stage 0, engine.precision amp: fp32 weights, gradients, AdamW state and EMA, bf16 autocast; blocks compiled),
with only the model, the resolution and the micro-batch changed. Each trial is one step on a batch of random
latents already on the GPU (the shard reader only holds host memory; its batches are a few MB on the GPU), after
warm-up steps at two batch sizes (compiles, the AdamW state). Peak = torch.cuda.max_memory_allocated /
max_memory_reserved over the step; "fits" = the step ran without running out of memory (torch.OutOfMemoryError,
or a cuBLAS/cuDNN workspace allocation failing).

Search, per model, resolution and activation checkpointing (model.grad_checkpointing) on/off: a step at 32 images
(the recipe's micro-batch; halved until one fits), one at 64, then a line through the measured peaks predicts the
batch that fills the GPU; trials at the prediction and bisection close in until the largest batch that ran is
within --tolerance (2%) of the smallest that ran out of memory. Batches stop at --max-tokens tokens per micro-batch
(1024 images at 256 px, 256 at 512, 64 at 1024): a row at that cap reads ">= N".

Where it differs from `dig train` (and why):
  * The blocks are compiled (regional, as model.compile) with the batch dimension dynamic from the first step and
    without CUDA graphs, so one compile serves every batch of a resolution (a DiG compile takes ~40 s; static
    shapes would recompile for the second batch size, as dynamo does in `dig train` only once). The recipe's exact
    setting (static shapes, compile_mode reduce-overhead = CUDA graphs) is run at one point right after that
    model's search (--recipe-check, default DiG-XL/2 at 256 px at the batch found): both peaks are printed.
  * One GPU: DeepSpeed's stage-0 step flattens the gradients into 500M-element buckets for its all-reduce; with
    several GPUs the trainer's overlapped all-reduce keeps gradients in fixed buckets instead, and NCCL adds its own
    buffers.
  * Not included: the sampling model (an fp32 copy of the weights, 4 B/param) and the VAE that stay on the GPU
    after the first sample grid (tracking.sample_every > 0), and the FID evaluator (tracking.eval_every > 0).
Each model runs in its own process, so an out-of-memory error or fragmentation cannot change the next model's rows.

    python -m bench.bench_memory --out $OUT                 # all of it (one H200: ~8 min, see --budget-s)
    python -m bench.bench_memory --models DiG-XL/2 --resolutions 256 --out $OUT
    python -m bench.bench_memory --analytic                  # parameter counts and the 20 B/param state, no GPU
    python -m bench.bench_memory --quick --out /tmp/m        # CPU dry run of the plumbing (tiny model, fake limit)

--quick runs on the CPU, which has no allocator statistics: a step's "peak" there is the training state plus the
bytes autograd saves in the forward, against a fake limit set so that about 9 images fit (plumbing only, no
memory numbers). The training state (weights, gradients, AdamW moments, EMA) is measured from the trainer's own
tensors in every mode and checked against the recipe's analytic 20 bytes per parameter.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import subprocess
import sys
import tempfile
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(REPO, "configs", "train", "dig-xl2-imagenet256.yaml")
MODELS = ("DiG-XL/2", "DiT-XL/2", "DiG-L/2", "DiG-B/2", "DiG-S/2")
RESOLUTIONS = (256, 512, 1024)
PROBE_BATCH = 32          # the recipe's micro-batch per GPU
MAX_TOKENS = 1024 * 256   # per micro-batch: 1024 images at 256 px
TINY = {"depth": 2, "hidden_size": 64, "num_heads": 2}
QUICK_FIT_IMAGES = 9.5    # --quick: the fake limit lets about this many images fit without checkpointing
GIB = 2 ** 30
# What the recipe keeps per trainable parameter (engine.precision amp, ZeRO 0; dig/train/engine.py, ema.py):
# fp32 weights (the engine's module is the master copy), fp32 gradients, AdamW exp_avg + exp_avg_sq in fp32, and the
# fp32 EMA beside them. AdamW's per-tensor step counters (4 B per tensor) come on top.
STATE_BYTES_PER_PARAM = {"weights": 4, "grads": 4, "adam_moments": 8, "ema": 4}


def analytic_state(n_params: int) -> dict[str, int]:
    state = {k: v * n_params for k, v in STATE_BYTES_PER_PARAM.items()}
    state["total"] = sum(state.values())
    return state


def param_count(name: str, overrides: dict | None = None) -> int:
    from dig.models import create_model

    with torch.device("meta"):
        model = create_model(name, input_size=32, **(overrides or {}))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# --- the search (pure: a trial function in, the largest batch that fits out) -------------------------------------

def search_max_batch(trial, capacity: float, cap: int, first: int = PROBE_BATCH, second: int | None = None,
                     tol: float = 0.02, max_trials: int = 12) -> dict:
    """Largest batch b <= cap for which `trial(b)` fits. `trial(b)` returns the step's peak bytes, or None when it
    ran out of memory; `capacity` is the memory the peaks are compared with (only used to predict where the edge
    is; fitting is decided by the trials). Stops when the largest fitting batch reaches `cap`, or when the smallest
    failing one is within max(1, tol x largest fitting) of it, or after `max_trials` trials.
    Returns max_batch (0: not even 1 fits), oom_batch (None: none tried), capped, and the trials in order."""
    fits: dict[int, float] = {}
    ooms: set[int] = set()
    trials: list[dict] = []

    def run(b: int) -> bool:
        peak = trial(b)
        trials.append({"batch": b, "peak": peak})
        if peak is None:
            ooms.add(b)
        else:
            fits[b] = peak
        return peak is not None

    def predict(lo: int) -> int | None:
        """The batch a line through two measured peaks puts at `capacity`: the largest fitting batch and the
        smallest one at least a quarter of it (a wide base: nearby points give a noisy slope), else the largest
        one below that."""
        below = [b for b in fits if b < lo]
        if not below:
            return None
        b0 = min([b for b in below if b >= lo / 4] or [max(below)])
        slope = (fits[lo] - fits[b0]) / (lo - b0)
        if slope <= 0:
            return None
        return int((capacity - fits[lo]) / slope) + lo

    b = max(1, min(first, cap))
    while not run(b):
        if b == 1:
            return {"max_batch": 0, "oom_batch": 1, "capped": False, "trials": trials}
        b = max(1, b // 2)
    if second is None:
        second = 2 * b
    if b < cap and second > b and second not in fits and second not in ooms:
        run(min(second, cap))
    last_oom = False
    while len(trials) < max_trials:
        lo = max(fits)
        hi = min(ooms) if ooms else None
        step = max(1, int(lo * tol))
        if lo >= cap or (hi is not None and hi - lo <= step):
            break
        pred = predict(lo)
        if hi is None:
            cand = min(cap, 4 * lo) if pred is None else min(cap, 16 * lo, max(pred, lo + step))
        elif last_oom or pred is None:
            cand = (lo + hi) // 2  # the line overshot: bisect
        else:
            cand = min(hi - 1, max(pred, lo + step))
        cand = max(cand, lo + 1)
        if hi is not None:
            cand = min(cand, hi - 1)
        last_oom = not run(cand)
    lo = max(fits)
    return {"max_batch": lo, "oom_batch": min(ooms) if ooms else None, "capped": lo >= cap, "trials": trials}


# --- meters: one training step in, its peak bytes out -------------------------------------------------------------

class CudaMeter:
    """Peak allocated / reserved bytes of the caching allocator over a step."""

    def __init__(self, device: torch.device):
        self.device = device

    def free(self) -> None:
        gc.collect()
        torch.cuda.empty_cache()

    def capacity(self) -> float:
        """What the allocator can hold: free device memory plus what it holds now (memory taken by the CUDA context,
        cuBLAS/NCCL outside the allocator and other processes is not available)."""
        self.free()
        free, _ = torch.cuda.mem_get_info(self.device)
        return free + torch.cuda.memory_reserved(self.device)

    def resident(self) -> int:
        return torch.cuda.memory_allocated(self.device)

    def measure(self, step) -> tuple[float, float]:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        step()
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device), torch.cuda.max_memory_reserved(self.device)


class SavedBytesMeter:
    """CPU stand-in (no allocator statistics there): a step's "peak" is `base` (the training state) plus the bytes
    autograd saves during the forward (each storage once, parameters excluded); past `limit` the forward raises
    torch.OutOfMemoryError at that point, as a real one would. Plumbing only: not a memory measurement."""

    def __init__(self, base: int, limit: float, params: list[torch.Tensor]):
        self.base, self.limit = base, limit
        self.param_storages = {p.untyped_storage().data_ptr() for p in params}
        self.armed = False
        self.count = 0
        self.seen: set[int] = set()

    def free(self) -> None:
        gc.collect()

    def capacity(self) -> float:
        return self.limit

    def resident(self) -> int:
        return 0

    def pack(self, t: torch.Tensor):
        if self.armed:
            key = t.untyped_storage().data_ptr()
            if key not in self.seen and key not in self.param_storages:
                self.seen.add(key)
                self.count += t.untyped_storage().nbytes()
                if self.base + self.count > self.limit:
                    raise torch.OutOfMemoryError(f"fake limit {self.limit / 2 ** 20:.1f} MiB (--quick)")
        return t

    def forward_hook(self, forward):
        """Wrap the trainer's forward so that only tensors saved by the forward are counted."""
        def counted(*args, **kwargs):
            with torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t):
                return forward(*args, **kwargs)
        return counted

    def measure(self, step) -> tuple[float, float]:
        self.count, self.seen, self.armed = 0, set(), True
        try:
            step()
        finally:
            self.armed = False
        peak = float(self.base + self.count)
        return peak, peak


# --- the worker: one model in one process --------------------------------------------------------------------------

def _storage_bytes(tensors) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        if t is not None and t.numel():
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def _base_optimizer(opt):
    while not isinstance(opt, torch.optim.Optimizer) and hasattr(opt, "optimizer"):
        opt = opt.optimizer
    return opt


def compile_blocks_dynamic_batch(module) -> None:
    """model.compile's regional compile (`compile_blocks`: torch.compile of each block's forward) with the batch
    dimension of the block's tensor inputs marked dynamic from the first call: one compile serves every batch (what
    dynamo itself does after a block has seen a second batch size; a new resolution recompiles once more, then the
    token count is dynamic too)."""
    for block in module.blocks:
        compiled = torch.compile(block.forward)

        def forward(*args, _compiled=compiled, **kwargs):
            for t in (*args, *kwargs.values()):
                if torch.is_tensor(t) and t.dim() > 1:
                    torch._dynamo.maybe_mark_dynamic(t, 0)
            return _compiled(*args, **kwargs)

        block.forward = forward


def build_trainer(name: str, resolution: int, workdir: str, overrides: dict, extra: list[str]):
    """`dig train`'s Trainer for the recipe config with this model and resolution, on a one-shard synthetic dataset
    (only its manifest is read: the steps get their batches from `synthetic_batch`)."""
    from dig.data.synthetic import write_synthetic_dataset
    from dig.train.config import resolve, validate
    from dig.train.trainer import Trainer

    data = os.path.join(workdir, f"latents{resolution}")
    if not os.path.exists(os.path.join(data, "manifest.json")):
        write_synthetic_dataset(data, num_shards=1, samples_per_shard=2, latent_size=resolution // 8,
                                resolution=resolution, num_classes=1000, dtype="float16")
    dotlist = [f"model.name={name}", f"data.path={data}", f"data.resolution={resolution}",
               "data.global_batch_size=1", "data.micro_batch_size=1", "data.prefetch=false",
               "data.prefetch_batches=0", f"run.dir={os.path.join(workdir, f'run{resolution}')}",
               "tracking.backend=none", "tracking.log_every=0", "tracking.sample_every=0", "tracking.eval_every=0",
               "checkpoint.every=0", "steps=1000000000"]
    dotlist += [f"model.overrides.{k}={v}" for k, v in overrides.items()] + list(extra)
    resolved = resolve(RECIPE, dotlist)
    cfg = validate(resolved, source=RECIPE)
    return Trainer(cfg, resolved), cfg


def close_trainer(tr) -> None:
    tr.data.close()
    if tr.run_lock is not None:
        tr.run_lock.release()


def synthetic_batch(tr, batch: int):
    from dig.data.reader import Batch

    c, h, w = tr.latent_shape
    dev = tr.rt.device
    return Batch(torch.randn(batch, c, h, w, device=dev), torch.randint(0, 1000, (batch,), device=dev),
                 [f"m{i}" for i in range(batch)])


def warmup_batch(module, cuda: bool) -> int:
    """A batch on the same side as the search's batches of the GLA backend choice (dig.ops: the fused Triton kernel
    when batch x heads fills the SMs, else fla), so that the warm-up compiles the graphs the trials use."""
    if not cuda or not hasattr(module.blocks[0], "dw_conv"):
        return 2
    return max(2, -(-torch.cuda.get_device_properties(0).multi_processor_count // module.num_heads))


def measure_state(tr, batch: int) -> dict:
    """Run one step and count the trainer's own tensors: weights, gradients (at the optimizer step), AdamW state,
    EMA. Bytes of distinct storages."""
    params = [p for p in tr.engine.module.parameters() if p.requires_grad]
    grads = {}
    step = tr.engine.step

    def step_counting_grads(*a, **k):
        grads["bytes"] = _storage_bytes(p.grad for p in params)
        return step(*a, **k)

    tr.engine.step = step_counting_grads
    tr.next_batch = lambda: synthetic_batch(tr, batch)
    try:
        tr.run_step()
    finally:
        tr.engine.step = step
    opt = _base_optimizer(tr.engine.optimizer)
    moments, other = [], []
    for st in opt.state.values():
        for key, t in st.items():
            if torch.is_tensor(t):
                (moments if key in ("exp_avg", "exp_avg_sq") else other).append(t)
    state = {"weights": _storage_bytes(params), "grads": grads.get("bytes", 0), "adam_moments": _storage_bytes(moments),
             "ema": _storage_bytes(tr.ema.shadow)}
    state["total"] = sum(state.values())
    state["adam_other"] = _storage_bytes(other)  # the per-tensor step counters
    state["params"] = sum(p.numel() for p in params)
    return state


def run_model(a, name: str, out_path: str, t_end: float, cuda: bool | None = None) -> None:
    from dig.train import trainer as trainer_module

    trainer_module.filter_known_warnings() if hasattr(trainer_module, "filter_known_warnings") else None
    if cuda is None:
        cuda = torch.cuda.is_available() and not a.quick
    overrides = dict(TINY) if a.quick else {}
    if cuda:
        import torch._dynamo as dynamo

        dynamo.config.cache_size_limit = max(dynamo.config.cache_size_limit, 64)
        if hasattr(dynamo.config, "accumulated_cache_size_limit"):
            dynamo.config.accumulated_cache_size_limit = max(dynamo.config.accumulated_cache_size_limit, 256)
    workdir = tempfile.mkdtemp(prefix="bench_memory_")
    fallback = ""  # set when compiling with a dynamic batch failed: model.compile's own way from then on
    for res in a.resolutions:
        if time.time() > t_end:
            _emit(out_path, {"model": name, "res": res, "error": "skipped (time budget)"})
            continue
        t0 = time.time()
        tr = None
        try:
            before = torch.cuda.memory_allocated() if cuda else 0  # left over from the previous resolution
            tr, cfg = build_trainer(name, res, workdir, overrides, ["model.compile=false"])
            module = tr.engine.module
            compiled = "eager"
            if cuda and not a.eager and not fallback:
                compile_blocks_dynamic_batch(module)
                compiled = "dynamic batch, no CUDA graphs"
            elif cuda and not a.eager:
                module.compile_blocks()
                compiled = fallback
            warm = warmup_batch(module, cuda)
            try:
                state = measure_state(tr, warm)  # the warm-up step: compiles, creates the AdamW state
            except Exception as e:
                if compiled == "eager" or fallback or isinstance(e, torch.OutOfMemoryError):
                    raise
                # the recipe's own compile then (here and for the next resolutions): static shapes, made dynamic by
                # dynamo after a shape change
                print(f"[bench_memory] compiling with a dynamic batch failed ({type(e).__name__}: {e}); compiling "
                      "as model.compile does", flush=True)
                for block in module.blocks:
                    block.__dict__.pop("forward", None)
                for p in module.parameters():
                    p.grad = None
                module.compile_blocks()
                fallback = compiled = f"static, then dynamic after a shape change (dynamic batch failed: " \
                                      f"{type(e).__name__})"
                state = measure_state(tr, warm)
            if compiled != "eager":
                # a second batch size before any trial: the parts of a block after a graph break (and a static
                # compile) are recompiled for a dynamic batch here, and Inductor's first-call kernel benchmarking
                # happens here, not inside a measured step
                tr.next_batch = lambda: synthetic_batch(tr, warm + 1)
                tr.run_step()
            tokens = module.grid_size[0] * module.grid_size[1]
            cap = max(1, a.max_tokens // tokens)
            params = [p for p in module.parameters() if p.requires_grad]
            if cuda:
                meter = CudaMeter(tr.rt.device)
            else:
                meter = SavedBytesMeter(0, float("inf"), params)
                tr.forward_loss = meter.forward_hook(tr.forward_loss)
            resident = meter.resident() if cuda else state["weights"] + state["adam_moments"] + state["ema"]
            common = {"model": name, "res": res, "tokens": tokens, "params": state["params"], "state": state,
                      "state_analytic": analytic_state(state["params"]), "resident_after_step": resident,
                      "compiled": compiled, "tiny_overrides": overrides or None, "warmup_s": time.time() - t0,
                      "allocated_before_build": before}
            if before > GIB:
                print(f"[bench_memory] warning: {before / GIB:.1f} GiB still allocated from the previous resolution "
                      "(its max batch is low by that much)", flush=True)
            for ckpt in (False, True):
                module.grad_checkpointing = ckpt
                if not cuda:
                    meter.base = resident + state["grads"]
                    meter.limit = float("inf")
                    tr.next_batch = lambda: synthetic_batch(tr, 1)
                    p1 = meter.measure(tr.run_step)[0]
                    tr.next_batch = lambda: synthetic_batch(tr, 2)
                    p2 = meter.measure(tr.run_step)[0]
                    if not ckpt:  # the fake limit, fixed by the run without checkpointing
                        fake_limit = p1 + (QUICK_FIT_IMAGES - 1) * (p2 - p1)
                    meter.limit = fake_limit
                else:
                    for b in (warm, warm + 1):  # a checkpointed step may compile the recomputation once
                        tr.next_batch = lambda b=b: synthetic_batch(tr, b)
                        tr.run_step()
                capacity = meter.capacity()
                row = dict(common, checkpointing=ckpt, capacity=capacity, cap=cap)
                row.update(_search(a, tr, meter, capacity, cap))
                row["wall_s"] = time.time() - t0
                _emit(out_path, row)
                t0 = time.time()
        except Exception as e:  # one failing model/resolution is reported, the others still run
            _emit(out_path, {"model": name, "res": res,
                             "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"})
        finally:
            if tr is not None:
                close_trainer(tr)
            del tr
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
    from dig.train.engine import shutdown

    shutdown()


def is_out_of_memory(e: BaseException) -> bool:
    text = str(e)
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in text or "ALLOC_FAILED" in text


def _search(a, tr, meter, capacity: float, cap: int) -> dict:
    params = [p for p in tr.engine.module.parameters() if p.requires_grad]
    peaks: dict[int, tuple[float, float]] = {}

    def trial(batch: int):
        tr.next_batch = lambda: synthetic_batch(tr, batch)
        meter.free()
        oom = False
        try:
            peaks[batch] = meter.measure(tr.run_step)
        except RuntimeError as e:  # torch.OutOfMemoryError, or a library's workspace allocation failing at the edge
            if not is_out_of_memory(e):
                raise
            oom = True
        if oom:  # outside the handler, so that the traceback's frames (and their activations) are gone
            for p in params:
                p.grad = None
            meter.free()
            print(f"[bench_memory]   batch {batch}: out of memory", flush=True)
            return None
        alloc, reserved = peaks[batch]
        print(f"[bench_memory]   batch {batch}: peak {alloc / GIB:.2f} GiB allocated, {reserved / GIB:.2f} "
              f"reserved", flush=True)
        return reserved

    result = search_max_batch(trial, capacity, cap, tol=a.tolerance)
    for t in result["trials"]:
        if t["peak"] is not None:
            t["peak_allocated"], t["peak_reserved"] = peaks[t["batch"]]
        t.pop("peak")
    fitting = sorted(b for b in peaks)
    if len(fitting) >= 2:  # activation bytes per image: slope of the allocated peak between the widest fitting pair
        b0, b1 = fitting[0], fitting[-1]
        result["bytes_per_image"] = (peaks[b1][0] - peaks[b0][0]) / (b1 - b0)
    at = PROBE_BATCH if PROBE_BATCH in peaks else result["max_batch"]
    if at in peaks:
        result["peak_batch"], (result["peak_allocated"], result["peak_reserved"]) = at, peaks[at]
    return result


def _emit(path: str, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
    if "error" in row:
        print(f"[bench_memory] {row['model']} {row['res']}px: {row['error']}", flush=True)
    else:
        print(f"[bench_memory] {row['model']} {row['res']}px ckpt={row['checkpointing']}: max batch "
              f"{'>= ' if row['capped'] else ''}{row['max_batch']} ({row['wall_s']:.0f} s)", flush=True)


def recipe_check(spec: str, batch: int, out_path: str) -> None:
    """The recipe exactly (static shapes, its compile_mode: CUDA graphs) at one model, resolution and batch."""
    name, res = spec.rsplit("@", 1)
    res = int(res)
    workdir = tempfile.mkdtemp(prefix="bench_memory_recipe_")
    row = {"model": name, "res": res, "batch": batch, "recipe_check": True}
    tr = None
    try:
        tr, cfg = build_trainer(name, res, workdir, {}, [])
        row["compile"] = f"static shapes, mode {cfg.model.compile_mode}" if cfg.model.compile else "eager"
        tr.next_batch = lambda: synthetic_batch(tr, batch)
        meter = CudaMeter(tr.rt.device)
        oom = False
        try:
            for _ in range(2):  # compile, CUDA-graph warm-up / recording
                tr.run_step()
            row["peak_allocated"], row["peak_reserved"] = meter.measure(tr.run_step)
        except RuntimeError as e:
            if not is_out_of_memory(e):
                raise
            oom = True
        row["fits"] = not oom
    except Exception as e:
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    finally:
        if tr is not None:
            close_trainer(tr)
    with open(out_path, "a") as f:
        f.write(json.dumps(row) + "\n")


# --- the driver -----------------------------------------------------------------------------------------------------

def _fmt_gib(x) -> str:
    return "" if x is None else f"{x / GIB:.1f}"


def table(rows: list[dict], unit: str = "GiB") -> str:
    """One line per model and resolution; sizes in GiB (MiB for the tiny --quick model)."""
    scale = {"GiB": GIB, "MiB": 2 ** 20}[unit]

    def size(x) -> str:
        return "" if x is None else f"{x / scale:.1f}"

    cols = ["model", "res", "tokens/img", "params (M)", f"state {unit} (measured)", f"state {unit} (20 B/param)",
            f"peak {unit} @32", "max batch/GPU", f"peak {unit} @32, ckpt", "max batch/GPU, ckpt"]
    by_key: dict[tuple, dict] = {}
    for r in rows:
        by_key.setdefault((r["model"], r["res"]), {})[r.get("checkpointing")] = r
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for (model, res), pair in by_key.items():
        plain, ckpt = pair.get(False), pair.get(True)
        base = plain or ckpt
        if base is None or "error" in base:
            err = (base or next(iter(pair.values()))).get("error", "no rows")
            lines.append(f"| {model} | {res} | " + " | ".join([""] * 7) + f" | {err} |")
            continue

        def peak(r):
            if r is None or "peak_allocated" not in r:
                return ""
            at = "" if r["peak_batch"] == PROBE_BATCH else f" (@{r['peak_batch']})"
            return size(r["peak_allocated"]) + at

        def maxb(r):
            if r is None or "error" in r:
                return "" if r is None else "error"
            return (">= " if r["capped"] else "") + str(r["max_batch"])

        lines.append("| " + " | ".join([
            model, str(res), str(base["tokens"]), f"{base['params'] / 1e6:.1f}",
            size(base["state"]["total"]), size(base["state_analytic"]["total"]),
            peak(plain), maxb(plain), peak(ckpt), maxb(ckpt)]) + " |")
    return "\n".join(lines)


def check_state(rows: list[dict]) -> list[str]:
    """Measured training state against the recipe's bytes per parameter; the mismatches, as lines."""
    bad = []
    for r in rows:
        if "state" not in r:
            continue
        for key in STATE_BYTES_PER_PARAM:
            if r["state"][key] != r["state_analytic"][key]:
                bad.append(f"{r['model']} {r['res']}px: {key} measured {r['state'][key]} B, analytic "
                           f"{r['state_analytic'][key]} B ({STATE_BYTES_PER_PARAM[key]} B/param)")
    return bad


def analytic_table(models) -> str:
    lines = ["| model | params (M) | state GiB (20 B/param: fp32 weights, grads, AdamW m+v, EMA) |", "|---|---|---|"]
    for m in models:
        n = param_count(m)
        lines.append(f"| {m} | {n / 1e6:.1f} | {analytic_state(n)['total'] / GIB:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--resolutions", default=",".join(map(str, RESOLUTIONS)))
    p.add_argument("--out", default=None, help="folder for bench_memory.json")
    p.add_argument("--max-tokens", type=int, default=MAX_TOKENS, help="largest micro-batch tried, in tokens")
    p.add_argument("--tolerance", type=float, default=0.02,
                   help="stop when the smallest batch that ran out of memory is within this fraction of the largest "
                        "that fit")
    p.add_argument("--budget-s", type=float, default=480.0,
                   help="models not started by then are skipped (listed); each runs at most until then")
    p.add_argument("--recipe-check", default="DiG-XL/2@256",
                   help="MODEL@RES run with the recipe's exact compile (static, CUDA graphs) at the batch found; "
                        "'none' to skip")
    p.add_argument("--eager", action="store_true", help="do not compile the blocks (the recipe compiles them)")
    p.add_argument("--analytic", action="store_true", help="print parameter counts and the analytic state only")
    p.add_argument("--quick", action="store_true", help="CPU dry run: tiny DiG-S/2 at 64 px, fake memory limit")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-recipe", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-batch", type=int, default=PROBE_BATCH, help=argparse.SUPPRESS)
    p.add_argument("--rows", default=None, help=argparse.SUPPRESS)
    p.add_argument("--end-time", type=float, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    models = [m for m in a.models.split(",") if m]
    try:
        a.resolutions = [int(r) for r in a.resolutions.split(",") if r]
    except ValueError:
        p.error(f"--resolutions: comma-separated integers, got {a.resolutions!r}")
    if any(r <= 0 or r % 16 for r in a.resolutions):
        p.error(f"--resolutions: multiples of 16 px (latent side divisible by the patch), got {a.resolutions}")
    if a.max_tokens < 1 or not 0 <= a.tolerance < 1:
        p.error("--max-tokens must be >= 1 and --tolerance in [0, 1)")
    from dig.models import list_models

    unknown = [m for m in models if m not in list_models()]
    if unknown:
        p.error(f"unknown model(s) {unknown}; see dig.models.list_models()")

    if a.worker:
        run_model(a, a.worker, a.rows, a.end_time or math.inf)
        return 0
    if a.worker_recipe:
        recipe_check(a.worker_recipe, a.worker_batch, a.rows)
        return 0
    if a.analytic:
        print(analytic_table(models))
        return 0
    if a.recipe_check != "none" and (a.recipe_check.count("@") != 1 or a.recipe_check.split("@")[0] not in list_models()
                                     or not a.recipe_check.split("@")[1].isdigit()):
        p.error(f"--recipe-check: MODEL@RES (e.g. DiG-XL/2@256) or none, got {a.recipe_check!r}")
    if a.quick:
        models, a.resolutions, a.recipe_check = ["DiG-S/2"], [64], "none"
        a.max_tokens = 64 * 16
    elif not torch.cuda.is_available():
        p.error("no CUDA device: the memory table is measured on a GPU (--quick: CPU dry run, --analytic: counts)")

    from .common import versions

    out_dir = a.out or tempfile.mkdtemp(prefix="bench_memory_")
    os.makedirs(out_dir, exist_ok=True)
    rows_path = os.path.join(out_dir, "bench_memory_rows.jsonl")
    if os.path.exists(rows_path):
        os.remove(rows_path)
    t_start = time.time()
    t_end = t_start + a.budget_s
    common = [f"--max-tokens={a.max_tokens}", f"--tolerance={a.tolerance}", "--rows", rows_path] + \
        (["--quick"] if a.quick else []) + (["--eager"] if a.eager else [])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    check_model, _, check_res = a.recipe_check.partition("@")
    recipe = None
    for m in models:
        for res in a.resolutions:
            left = t_end - time.time()
            if left < 60:
                _emit(rows_path, {"model": m, "res": res, "error": "skipped (time budget)"})
                continue
            print(f"[bench_memory] {m} {res}px: {left:.0f} s of budget left", flush=True)
            # One process per model and resolution: a trainer built in the same process before (its compiled
            # blocks, DeepSpeed's engine) kept 5-8 GiB allocated on the H200, which lowered every later max batch.
            # No new worker in the last minute; one still running 30 s past the budget is stopped.
            rc = _run_worker([sys.executable, "-m", "bench.bench_memory", "--worker", m, "--end-time",
                              str(t_end - 60), f"--resolutions={res}", *common], env, left + 30)
            if rc != 0:
                _emit(rows_path, {"model": m, "res": res, "error": f"worker exited with {rc}"})
            if m == check_model and str(res) == check_res:  # right after its search: it needs the batch found
                recipe = _recipe_check(a.recipe_check, check_res, rows_path, env, t_end)
    rows = [r for r in _read_rows(rows_path) if not r.get("recipe_check")]

    device = torch.cuda.get_device_name() if torch.cuda.is_available() and not a.quick else "cpu (fake limit)"
    total = torch.cuda.mem_get_info()[1] if torch.cuda.is_available() and not a.quick else None
    result = {"versions": versions(), "device": device, "total_memory": total, "recipe": os.path.relpath(RECIPE, REPO),
              "command": " ".join(sys.argv), "settings": {"max_tokens": a.max_tokens, "tolerance": a.tolerance,
                                                           "eager": a.eager, "quick": a.quick},
              "wall_s": time.time() - t_start, "rows": rows, "recipe_check": recipe,
              "state_mismatches": check_state(rows)}
    with open(os.path.join(out_dir, "bench_memory.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"\n{device}{'' if total is None else f', {total / GIB:.1f} GiB'}; recipe {result['recipe']}; "
          f"blocks {'eager' if a.eager or a.quick else 'compiled (dynamic batch, no CUDA graphs)'}; "
          f"max batch within {a.tolerance:.0%} of the first that ran out of memory, tried up to {a.max_tokens} "
          f"tokens per micro-batch\n")
    print(table(rows, "MiB" if a.quick else "GiB"))
    if recipe is not None:
        if "error" in recipe:
            print(f"\nrecipe check {recipe['model']} {recipe['res']}px batch {recipe['batch']}: {recipe['error']}")
        else:
            got = (f"peak {_fmt_gib(recipe['peak_allocated'])} GiB allocated, {_fmt_gib(recipe['peak_reserved'])} "
                   f"reserved" if recipe["fits"] else "OUT OF MEMORY")
            print(f"\nrecipe check ({recipe['compile']}) {recipe['model']} {recipe['res']}px batch {recipe['batch']}: "
                  f"{got}; the search's step at that batch reserved {_fmt_gib(recipe.get('search_peak_reserved'))} GiB")
    if result["state_mismatches"]:
        print("\ntraining state differs from the recipe's 20 B/param:\n  " + "\n  ".join(result["state_mismatches"]))
    else:
        print("\ntraining state = 20 B/param (fp32 weights, grads, AdamW m+v, EMA) in every row, as measured")
    print(f"\nwritten {os.path.join(out_dir, 'bench_memory.json')} ({result['wall_s']:.0f} s)")
    return 1 if result["state_mismatches"] else 0


def _recipe_check(spec: str, res: str, rows_path: str, env: dict, t_end: float) -> dict | None:
    name = spec.rsplit("@", 1)[0]
    found = [r for r in _read_rows(rows_path) if r.get("model") == name and str(r.get("res")) == res
             and r.get("checkpointing") is False and r.get("max_batch")]
    batch = found[0]["max_batch"] if found else PROBE_BATCH
    left = t_end - time.time()
    if left < 75:  # one static compile and three steps
        return {"model": name, "res": int(res), "batch": batch, "error": "skipped (time budget)"}
    print(f"[bench_memory] recipe check: {spec} at batch {batch}, {left:.0f} s of budget left", flush=True)
    rc = _run_worker([sys.executable, "-m", "bench.bench_memory", "--worker-recipe", spec, "--worker-batch",
                      str(batch), "--models", name, "--rows", rows_path], env, left + 30)
    recipe = next((r for r in _read_rows(rows_path) if r.get("recipe_check")), None)
    if recipe is None:
        return {"model": name, "res": int(res), "batch": batch, "error": f"worker exited with {rc}"}
    if found:
        recipe["search_peak_reserved"] = next(
            (t.get("peak_reserved") for t in found[0]["trials"] if t["batch"] == batch), None)
    return recipe


def _run_worker(cmd: list[str], env: dict, timeout: float) -> int:
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait()
        return -9


def _read_rows(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


if __name__ == "__main__":
    sys.exit(main())
