"""Overhead of the full `dig train` step over the bare model step, side by side in one process.

  bare:    the model, batch, diffusion loss and precision of the trainer as a plain loop: fp32 params, bf16
           autocast, fused AdamW, grad clipping; the batch already on the device. Run first, so that nothing
           DeepSpeed patches into torch can touch it.
  trainer: Trainer.run_step of dig.train.trainer (what `dig train` loops over) on synthetic shards in the real
           format: DeepSpeed engine (ZeRO stage as given), bf16 on GPU, the shard reader (loading process,
           batch thread, pinned memory on GPU), EMA, the metric window and the periodic metric logging (MLflow
           replaced by the no-op tracker: the GPU machine has no MLflow; its cost is an HTTP call every
           `log_every` steps, off the GPU). No checkpoints, no sample grids.

    python -m bench.bench_trainer_overhead --model DiG-B/2 --resolution 256 --batch 64 --steps 30
    python -m bench.bench_trainer_overhead --quick        # CPU dry run at a tiny size
    python -m bench.bench_trainer_overhead --tiny --override depth=12 --resolution 64 --batch 2 --profile

Prints a table (median and mean ms/step, img/s, CPU time of the training loop's thread, overhead %) and writes
trainer_overhead_<model>_<res>_zero<stage>.json under --out.

Where the time goes (host overhead shows best on the CPU with a small compute, e.g. --tiny or batch 2):
  --profile     mean ms per step of each phase of both loops (data, forward, backward, optimizer step, EMA,
                logging, ...; "other" is the rest of the step: bookkeeping and host syncs). On CUDA every phase
                boundary synchronises, so phases are attributed correctly but the step is slower than unprofiled;
                the median table comes from separate, unprofiled steps.
  --cprofile N  the N Python functions with the most own time over the trainer's profiled steps (cProfile):
                DeepSpeed's per-module hooks, the reader, the EMA, ...
  --sync-debug N  (CUDA) the host syncs of N trainer steps by call site (torch.cuda.set_sync_debug_mode): each
                one stops the CPU from queueing work ahead of the GPU.
  --gpu-idle N  (CUDA) N more steps of each loop under torch.profiler, unsynchronised: GPU busy and idle ms per
                step, the idle time charged to the phase and operator whose launch ended each gap (bench.gpu_idle).
                --trace PREFIX keeps the traces (chrome://tracing, Perfetto; `python3 -m bench.gpu_idle FILE`).
Both loops run under the trainer's host settings (`host.*`: garbage collection paced by steps, the GIL's switch
interval; dig/train/host_pacing.py); `--set host.gc_every=0 --set host.gil_switch_interval_ms=5` gives Python's own.
"""
from __future__ import annotations

import argparse
import cProfile
import collections
import gzip
import io
import json
import os
import pstats
import shutil
import statistics
import sys
import tempfile
import time

import torch

TINY = {"depth": 2, "hidden_size": 64, "num_heads": 2}


def host_settings(settings: list[str]):
    """The `host.*` section of the training config from --set KEY=VALUE overrides (defaults for the rest)."""
    from dig.train.config import HostConfig, resolve

    return HostConfig(**resolve(overrides=[s for s in settings if s.startswith("host.")]).get("host", {}))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class Phases:
    """Wall time per named phase, summed over steps; wraps callables in place."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = collections.defaultdict(float)
        self.enabled = False
        self.annotate = False  # name the phase in a profiler trace (no syncs, no timing)

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            if self.annotate:
                with torch.profiler.record_function(name):
                    return fn(*args, **kwargs)
            if not self.enabled:
                return fn(*args, **kwargs)
            _sync(self.device)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                _sync(self.device)
                self.seconds[name] += time.perf_counter() - t0
        return timed

    def table(self, steps: int, total: float) -> dict[str, float]:
        out = {k: v / steps * 1e3 for k, v in self.seconds.items()}
        out["other"] = total / steps * 1e3 - sum(out.values())
        out["total"] = total / steps * 1e3
        return out


def _timed_loop(step_fn, steps: int, device: torch.device) -> tuple[list[float], list[float]]:
    """Wall time per step, and the CPU time of this (the training loop's) thread per step: on a busy machine
    the latter hardly depends on what other processes do, and without a GPU it is compute plus host overhead."""
    times, cpu = [], []
    for _ in range(steps):
        _sync(device)
        t0, c0 = time.perf_counter(), time.thread_time()
        step_fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
        cpu.append(time.thread_time() - c0)
    return times, cpu


def _phase_loop(step_fn, steps: int, device: torch.device, phases: Phases) -> dict[str, float]:
    phases.enabled = True
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step_fn()
    _sync(device)
    phases.enabled = False
    return phases.table(steps, time.perf_counter() - t0)


def _idle_loop(step_fn, steps: int, device: torch.device, phases: Phases, trace: str | None = None) -> dict:
    """GPU busy / idle per step over `steps` unsynchronised steps, gaps charged to the phase that launched the work
    ending them (bench.gpu_idle). `trace`: also keep the profiler's chrome trace there, gzipped."""
    from torch.profiler import ProfilerActivity, profile

    from bench.gpu_idle import gpu_idle

    phases.annotate = True
    _sync(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        with torch.profiler.record_function("(outside the named phases)"):
            for _ in range(steps):
                step_fn()
        _sync(device)
    phases.annotate = False
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "trace.json")
        prof.export_chrome_trace(path)
        if trace:
            with open(path, "rb") as f, gzip.open(trace, "wb") as out:
                shutil.copyfileobj(f, out)
        with open(path) as f:
            return gpu_idle(json.load(f), steps)


def _cprofile_loop(step_fn, steps: int, device: torch.device, top: int) -> str:
    prof = cProfile.Profile()
    _sync(device)
    prof.enable()
    for _ in range(steps):
        step_fn()
    _sync(device)
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(top)
    return buf.getvalue()


def _sync_sites(step_fn, steps: int, device: torch.device) -> dict[str, float]:
    """Synchronising CUDA calls per step, by the Python line that made them."""
    import warnings

    sites: collections.Counter = collections.Counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(steps):
                step_fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    for w in caught:
        if "synchroniz" in str(w.message):
            where = w.filename.split("site-packages/")[-1] if "site-packages" in w.filename else os.path.relpath(
                w.filename)
            sites[f"{where}:{w.lineno}"] += 1
    _sync(device)
    return {site: n / steps for site, n in sites.most_common()}


def bare_step_times(name: str, kwargs: dict, batch: int, steps: int, warmup: int, device: torch.device,
                    bf16: bool, lr: float, profile: bool, compile_mode: str | None = None, idle_steps: int = 0,
                    compile_scope: str = "blocks", host=None, trace: str | None = None):
    from dig.train.host_pacing import HostPacing
    from dig.diffusion import create_diffusion
    from dig.models import create_model

    torch.manual_seed(0)
    model = create_model(name, **kwargs).to(device).train()
    if compile_mode is not None and compile_scope == "stack":
        model.compile_block_stack(mode=compile_mode)
    elif compile_mode is not None:
        model.compile_blocks(mode=compile_mode)
    cudagraphs = compile_mode == "reduce-overhead"
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, fused=device.type == "cuda")
    diffusion = create_diffusion()
    if compile_mode is not None:
        diffusion.compile_losses()  # as the trainer does with model.compile
    h, w = model.latent_hw
    x = torch.randn(batch, model.in_channels, h, w, device=device)
    y = torch.randint(0, model.num_classes, (batch,), device=device)
    phases = Phases(device)

    def forward():
        t = torch.randint(0, diffusion.num_timesteps, (batch,), device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            return diffusion.training_losses(model, x, t, model_kwargs=dict(y=y))["loss"].mean()

    def optimizer_step():
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    forward_p, backward_p = phases.wrap("forward", forward), phases.wrap("backward", lambda l: l.backward())
    step_p = phases.wrap("optimizer step", optimizer_step)

    host = host or host_settings([])
    pacing = HostPacing(host.gc_every, host.gil_switch_interval_ms)  # as the trainer's fit() runs its steps
    done = 0

    def step():
        nonlocal done
        if cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        loss = forward_p()
        opt.zero_grad(set_to_none=True)
        backward_p(loss)
        step_p()
        loss.item()  # the trainer reads its loss back every step too
        done += 1
        pacing.step_done(done)

    with pacing:
        _timed_loop(step, warmup, device)
        times, cpu = _timed_loop(step, steps, device)
        table = _phase_loop(step, steps, device, phases) if profile else None
        idle = _idle_loop(step, idle_steps, device, phases, trace) if idle_steps else None
    del model, opt
    return times, cpu, table, idle


def trainer_step_times(name: str, overrides: dict, resolution: int, batch: int, steps: int, warmup: int,
                       zero_stage: int, workdir: str, log_every: int, profile: bool, cprofile: int,
                       sync_debug: int, settings: list[str] = (), idle_steps: int = 0, trace: str | None = None):
    from dig.data.synthetic import write_synthetic_dataset
    from dig.train import trainer as trainer_module
    from dig.train.config import resolve, validate
    from dig.train.engine import free_loopback_port
    from dig.train.tracking import NullTracker

    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(free_loopback_port())}.items():
        os.environ.setdefault(key, value)
    latent = resolution // 8
    per_shard = max(batch, 64)
    total_steps = warmup + (2 + bool(profile) + bool(cprofile)) * steps + sync_debug + idle_steps
    num_shards = max(2, -(-(total_steps + 4) * batch // per_shard))
    data = os.path.join(workdir, "latents")
    write_synthetic_dataset(data, num_shards=num_shards, samples_per_shard=per_shard, latent_size=latent,
                            resolution=resolution, num_classes=1000, dtype="float16")
    base = {
        "run": {"name": "bench", "dir": os.path.join(workdir, "run")},
        "model": {"name": name, "overrides": overrides},
        "data": {"path": data, "resolution": resolution, "global_batch_size": batch, "micro_batch_size": batch},
        "engine": {"zero_stage": zero_stage},
        "steps": total_steps, "checkpoint": {"every": 0},
        "tracking": {"log_every": log_every, "sample_every": 0},
    }
    resolved = resolve(base=base, overrides=list(settings))
    cfg = validate(resolved)
    trainer_module.make_tracker = lambda *a, **k: NullTracker()
    tr = trainer_module.Trainer(cfg, resolved)
    device = tr.rt.device
    phases = Phases(device)
    # the phases of a step, timed where the trainer calls them
    tr.data.next_batch = phases.wrap("data", tr.data.next_batch)
    tr.forward_loss = phases.wrap("forward", tr.forward_loss)
    tr.agree = phases.wrap("loss readback", tr.agree)
    tr.engine.backward = phases.wrap("backward", tr.engine.backward)
    tr.engine.step = phases.wrap("optimizer step", tr.engine.step)
    tr.update_ema = phases.wrap("ema", tr.update_ema)
    tr.maybe_log_metrics = phases.wrap("logging", tr.maybe_log_metrics)
    tr._should_stop = phases.wrap("stop check", tr._should_stop)

    def step():
        if tr._should_stop():
            raise RuntimeError("the trainer was asked to stop")
        tr.run_step()

    with tr.host_pacing:  # as fit() runs the steps
        _timed_loop(step, warmup, device)
        times, cpu = _timed_loop(step, steps, device)
        table = _phase_loop(step, steps, device, phases) if profile else None
        report = _cprofile_loop(step, steps, device, cprofile) if cprofile else None
        syncs = _sync_sites(step, sync_debug, device) if sync_debug and device.type == "cuda" else None
        idle = _idle_loop(step, idle_steps, device, phases, trace) if idle_steps else None
    tr.data.close()
    from dig.train.engine import shutdown

    shutdown()
    return times, cpu, device, table, report, syncs, idle


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="DiG-B/2")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--zero-stage", type=int, default=3)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--out", default=None)
    p.add_argument("--tiny", action="store_true", help=f"the model at {TINY} (host overhead dominates)")
    p.add_argument("--override", action="append", default=[], metavar="KEY=INT",
                   help="a model override (create_model keyword), e.g. depth=12; after --tiny")
    p.add_argument("--quick", action="store_true", help="CPU dry run: tiny model, few steps")
    p.add_argument("--compile", action="store_true",
                   help="regional compile in both loops (bare: compile_blocks(), trainer: model.compile=true)")
    p.add_argument("--bare-compile-mode", default=None, metavar="MODE",
                   help="torch.compile mode of the bare loop's blocks (default, reduce-overhead, ...); implies compile")
    p.add_argument("--bare-compile-scope", choices=("blocks", "stack"), default="blocks",
                   help="bare loop: compile each block (compile_blocks, as the trainer) or the whole block stack as "
                        "one region (compile_block_stack: one CUDA graph for all blocks with reduce-overhead)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="settings",
                   help="a training-config override for the trainer loop, e.g. engine.deepspeed_config=PATH "
                        "(host.* settings apply to both loops)")
    p.add_argument("--bare-only", action="store_true", help="time the bare loop only")
    p.add_argument("--trainer-only", action="store_true", help="skip the bare loop (no overhead figure)")
    p.add_argument("--json", default=None, metavar="PATH", help="with --bare-only: write its numbers here")
    p.add_argument("--profile", action="store_true", help="per-phase ms/step of both loops (extra steps)")
    p.add_argument("--cprofile", type=int, default=0, metavar="N", help="top N Python functions by own time")
    p.add_argument("--sync-debug", type=int, default=0, metavar="N", help="(CUDA) host syncs of N trainer steps")
    p.add_argument("--gpu-idle", type=int, default=0, metavar="N",
                   help="(CUDA) GPU busy/idle over N profiled steps of each loop, idle charged to phases")
    p.add_argument("--trace", default=None, metavar="PREFIX",
                   help="with --gpu-idle: keep each loop's profiler trace as PREFIX_{bare,trainer}.json.gz")
    a = p.parse_args(argv)
    host = host_settings(a.settings)
    overrides: dict = dict(TINY) if a.tiny else {}
    overrides.update({k: int(v) for k, v in (o.split("=", 1) for o in a.override)})
    if a.quick:
        a.model, a.resolution, a.batch, a.steps, a.warmup = "DiG-S/2", 64, 4, 3, 1
        overrides = dict(TINY)

    # The bare loop first: DeepSpeed may patch torch globally (ZeRO-3's memory_efficient_linear replaces
    # torch.nn.functional.linear for the whole process), which must not slow the reference down.
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    idle_steps = a.gpu_idle if device.type == "cuda" else 0
    kwargs = dict(input_size=a.resolution // 8, num_classes=1000, **overrides)
    compile_mode = a.bare_compile_mode or ("default" if a.compile else None)
    settings = list(a.settings) + (["model.compile=true"] if a.compile else [])
    if a.trainer_only:
        bare_times, bare_cpu, bare_phases, bare_idle = [float("nan")], [float("nan")], {}, None
    else:
        bare_times, bare_cpu, bare_phases, bare_idle = bare_step_times(
            a.model, kwargs, a.batch, a.steps, a.warmup, device, bf16=device.type == "cuda", lr=1e-4,
            profile=a.profile, compile_mode=compile_mode, idle_steps=idle_steps, compile_scope=a.bare_compile_scope,
            host=host, trace=a.trace and f"{a.trace}_bare.json.gz")
    if a.bare_only:
        med = statistics.median(bare_times)
        if a.json:
            with open(a.json, "w") as f:
                json.dump({"model": a.model, "resolution": a.resolution, "batch": a.batch, "compile": compile_mode,
                           "compile_scope": a.bare_compile_scope,
                           "median_ms": med * 1e3, "img_per_s": a.batch / med,
                           "peak_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else None,
                           "bare_ms": [t * 1e3 for t in bare_times], "gpu_idle": bare_idle}, f, indent=1)
        print(f"\nbare only: {a.model} {a.resolution}px batch {a.batch} compile={compile_mode} "
              f"({a.bare_compile_scope}): median "
              f"{med * 1e3:.1f} ms, {a.batch / med:.1f} img/s, loop CPU {statistics.median(bare_cpu) * 1e3:.1f} ms")
        if bare_phases:
            print("phases ms: " + " ".join(f"{k}={v:.1f}" for k, v in bare_phases.items()))
        if bare_idle:
            from bench.gpu_idle import format_report

            print("\n" + format_report(f"GPU idle, bare loop, {idle_steps} profiled steps", bare_idle))
        return
    torch.cuda.empty_cache() if device.type == "cuda" else None
    with tempfile.TemporaryDirectory() as work:
        trainer_times, trainer_cpu, device, trainer_phases, report, syncs, trainer_idle = trainer_step_times(
            a.model, overrides, a.resolution, a.batch, a.steps, a.warmup, a.zero_stage, work, a.log_every,
            a.profile, a.cprofile, a.sync_debug, settings, idle_steps, a.trace and f"{a.trace}_trainer.json.gz")

    rows = []
    for label, times, cpu in (("bare model step", bare_times, bare_cpu),
                              (f"dig train step (ZeRO-{a.zero_stage})", trainer_times, trainer_cpu)):
        med = statistics.median(times)
        rows.append({"step": label, "median_ms": med * 1e3, "img_per_s": a.batch / med,
                     "mean_ms": statistics.fmean(times) * 1e3, "min_ms": min(times) * 1e3,
                     "max_ms": max(times) * 1e3, "loop_cpu_ms": statistics.median(cpu) * 1e3})
    overhead = rows[1]["median_ms"] / rows[0]["median_ms"] - 1
    overhead_mean = rows[1]["mean_ms"] / rows[0]["mean_ms"] - 1  # counts the occasional slow step
    overhead_cpu = rows[1]["loop_cpu_ms"] / rows[0]["loop_cpu_ms"] - 1
    result = {"model": a.model, "overrides": overrides, "compile": compile_mode,
              "host": host.model_dump(),
              "bare_compile_scope": a.bare_compile_scope, "settings": settings, "resolution": a.resolution,
              "batch": a.batch,
              "steps": a.steps, "zero_stage": a.zero_stage,
              "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "rows": rows, "overhead": overhead, "overhead_mean": overhead_mean,
              "overhead_loop_cpu": overhead_cpu,
              "trainer_ms": [t * 1e3 for t in trainer_times], "bare_ms": [t * 1e3 for t in bare_times],
              "trainer_loop_cpu_ms": [t * 1e3 for t in trainer_cpu], "bare_loop_cpu_ms": [t * 1e3 for t in bare_cpu],
              "phases_ms": {"bare": bare_phases, "trainer": trainer_phases}, "syncs_per_step": syncs,
              "gpu_idle": {"bare": bare_idle, "trainer": trainer_idle}}
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        tag = f"{a.model.replace('/', '_')}_{a.resolution}_zero{a.zero_stage}{'_compile' if compile_mode else ''}"
        with open(os.path.join(a.out, f"trainer_overhead_{tag}.json"), "w") as f:
            json.dump(result, f, indent=1)
    size = f"{a.model}{' (tiny)' if overrides else ''}"
    print(f"\n{size} {a.resolution}px batch {a.batch}, {a.steps} timed steps after {a.warmup} warm-up, "
          f"{result['device']}, compile={compile_mode}, settings={settings}, GIL switch interval "
          f"{host.gil_switch_interval_ms or sys.getswitchinterval() * 1e3:g} ms, "
          f"{f'GC every {host.gc_every} steps' if host.gc_every else 'automatic GC'}")
    print(f"{'step':<28}{'median ms':>12}{'mean':>9}{'min':>9}{'max':>9}{'img/s':>10}{'loop CPU ms':>13}")
    for r in rows:
        print(f"{r['step']:<28}{r['median_ms']:>12.1f}{r['mean_ms']:>9.1f}{r['min_ms']:>9.1f}{r['max_ms']:>9.1f}"
              f"{r['img_per_s']:>10.1f}{r['loop_cpu_ms']:>13.1f}")
    print(f"overhead of the full trainer step: {overhead * 100:+.1f}% (median), {overhead_mean * 100:+.1f}% (mean), "
          f"{overhead_cpu * 100:+.1f}% (loop CPU)")
    if a.profile:
        print(f"\nphases, mean ms/step over {a.steps} profiled steps"
              f"{' (synchronised at every phase boundary)' if device.type == 'cuda' else ''}")
        names = list(dict.fromkeys([*trainer_phases, *bare_phases]))
        names = [n for n in names if n not in ("other", "total")] + ["other", "total"]
        print(f"{'phase':<18}{'bare':>10}{'trainer':>10}")
        for n in names:
            b, t = bare_phases.get(n), trainer_phases.get(n)
            print(f"{n:<18}{'' if b is None else f'{b:.2f}':>10}{'' if t is None else f'{t:.2f}':>10}")
    if syncs is not None:
        print(f"\nhost syncs per trainer step ({a.sync_debug} steps; log_every={a.log_every}), by call site:")
        for site, n in syncs.items():
            print(f"  {n:6.2f}  {site}")
        print(f"  {sum(syncs.values()):6.2f}  in all")
    if idle_steps:
        from bench.gpu_idle import format_report

        for label, idle in (("bare", bare_idle), ("trainer", trainer_idle)):
            if idle:
                print("\n" + format_report(f"GPU idle, {label} loop, {idle_steps} profiled steps", idle))
    if report:
        print(f"\ntrainer, top {a.cprofile} Python functions by own time over {a.steps} steps:\n{report}")


if __name__ == "__main__":
    main()
