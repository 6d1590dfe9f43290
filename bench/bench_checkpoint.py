"""How long a checkpoint stops training: the trainer's save with the write in the background (checkpoint.background
=true, the default) against the same save done inline (background=false: what the loop used to wait for).

One process, the real Trainer (DeepSpeed engine, ZeRO stage as given, EMA, shard reader on synthetic shards;
MLflow replaced by the no-op tracker). For each mode: a few warm-up steps, then `--saves` rounds of
[save_checkpoint, `--steps-between` training steps], then the final save waited for. Reported per mode:
  blocked_s   seconds save_checkpoint() held the loop (median, max)
  durable_s   seconds from the start of a save until `latest` named it (background mode: the write behind training)
  step_ms     median step time while a write was in flight vs. with none (what the background thread costs)

    python -m bench.bench_checkpoint --quick                               # CPU, tiny model, seconds
    python -m bench.bench_checkpoint --model DiG-S/2 --resolution 64 --batch 4          # CPU, the table in the note
    python -m bench.bench_checkpoint --model DiG-XL/2 --resolution 256 --batch 32 --zero-stage 3   # one GPU
    ... --uri s3://bucket/prefix     # upload to S3 (AWS_ENDPOINT_URL etc. from the environment)

Writes checkpoint_<model>_<res>_zero<stage>.json under --out.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

TINY = {"depth": 2, "hidden_size": 64, "num_heads": 2}


def run_mode(background: bool, name: str, overrides: dict, resolution: int, batch: int, zero_stage: int,
             saves: int, steps_between: int, workdir: str, uri: str | None) -> dict:
    import torch

    from dig.data.synthetic import write_synthetic_dataset
    from dig.train import trainer as trainer_module
    from dig.train.config import resolve, validate
    from dig.train.engine import free_loopback_port, shutdown
    from dig.train.tracking import NullTracker

    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(free_loopback_port()))
    latent = resolution // 8
    warmup = 3
    total = warmup + saves * (steps_between + 1) + 2
    per_shard = max(batch, 16)
    data = os.path.join(workdir, "latents")
    if not os.path.exists(data):
        write_synthetic_dataset(data, num_shards=max(2, -(-(total + 2) * batch // per_shard)),
                                samples_per_shard=per_shard, latent_size=latent, resolution=resolution,
                                num_classes=1000, dtype="float16")
    run_dir = os.path.join(workdir, f"run-{'bg' if background else 'inline'}")
    base = {
        "run": {"name": "bench", "dir": run_dir},
        "model": {"name": name, "overrides": overrides},
        "data": {"path": data, "resolution": resolution, "global_batch_size": batch, "micro_batch_size": batch},
        "engine": {"zero_stage": zero_stage},
        "steps": total, "checkpoint": {"every": 0, "keep_last": 1, "background": background,
                                       **({"uri": f"{uri.rstrip('/')}/{os.path.basename(run_dir)}"} if uri else {})},
        "tracking": {"log_every": 0, "sample_every": 0},
    }
    resolved = resolve(base=base)
    cfg = validate(resolved)
    trainer_module.make_tracker = lambda *a, **k: NullTracker()
    tr = trainer_module.Trainer(cfg, resolved)
    cuda = tr.rt.device.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def timed_step() -> float:
        sync()
        t0 = time.perf_counter()
        tr.run_step()
        sync()
        return time.perf_counter() - t0

    for _ in range(warmup):
        timed_step()
    blocked, durable, busy_steps, idle_steps = [], [], [], []
    for _ in range(saves):
        sync()
        t0 = time.perf_counter()
        tr.save_checkpoint()
        blocked.append(time.perf_counter() - t0)
        for _ in range(steps_between):
            in_flight = tr.checkpoints.in_flight()
            (busy_steps if in_flight else idle_steps).append(timed_step())
        tr.checkpoints.wait()
        durable.append(tr.checkpoints.durable_s[-1])
        timed_step()  # the next save is of a new step
    tr.data.close()
    if tr.run_lock is not None:
        tr.run_lock.release()
    shutdown()
    size = _size_mib(os.path.join(run_dir, "checkpoints"))
    shutil.rmtree(run_dir, ignore_errors=True)  # DiG-XL/2: ~11 GB per checkpoint
    med = statistics.median
    return {
        "background": background,
        "blocked_s_median": med(blocked), "blocked_s_max": max(blocked), "blocked_s": blocked,
        "durable_s_median": med(durable),
        "step_ms_while_writing": med(busy_steps) * 1e3 if busy_steps else None,
        "step_ms_idle": med(idle_steps) * 1e3 if idle_steps else None,
        "steps_while_writing": len(busy_steps),
        "checkpoint_mib": size,
        "device": str(tr.rt.device),
    }


def _size_mib(folder: str) -> float:
    total = 0
    for root, _, files in os.walk(folder):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total / 2 ** 20


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="DiG-S/2")
    p.add_argument("--override", action="append", default=[], help="model override key=int, e.g. depth=2")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--zero-stage", type=int, default=3)
    p.add_argument("--saves", type=int, default=3)
    p.add_argument("--steps-between", type=int, default=4)
    p.add_argument("--uri", default=None, help="checkpoint.uri (folder or s3://); default <workdir>/run/checkpoints")
    p.add_argument("--workdir", default=None)
    p.add_argument("--out", default="bench/results")
    p.add_argument("--quick", action="store_true", help="tiny model, 2 saves: a dry run")
    p.add_argument("--mode", choices=["inline", "background"], help=argparse.SUPPRESS)  # one mode, JSON on stdout
    args = p.parse_args(argv)
    overrides = dict((k, int(v)) for k, v in (o.split("=", 1) for o in args.override))
    if args.quick:
        overrides, args.saves, args.steps_between = {**TINY, **overrides}, 2, 2
    workdir = args.workdir or tempfile.mkdtemp(prefix="dig-bench-ckpt-")
    if args.mode:
        r = run_mode(args.mode == "background", args.model, overrides, args.resolution, args.batch,
                     args.zero_stage, args.saves, args.steps_between, workdir, args.uri)
        print("RESULT " + json.dumps(r))
        return
    results = {}
    for mode in ("inline", "background"):  # each in a fresh process (one process group per process)
        cmd = [sys.executable, "-m", "bench.bench_checkpoint", "--mode", mode, "--workdir", workdir,
               *(argv if argv is not None else sys.argv[1:])]
        out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
        results[mode] = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
    print(f"{args.model} {args.resolution}px batch {args.batch} ZeRO-{args.zero_stage} on "
          f"{results['inline']['device']}, checkpoint {results['inline']['checkpoint_mib']:.0f} MiB")
    print(f"{'mode':<11}{'blocked s (median / max)':>26}{'durable s':>11}{'step ms writing / idle':>26}")
    for mode, r in results.items():
        writing = f"{r['step_ms_while_writing']:.0f}" if r["step_ms_while_writing"] is not None else "-"
        idle = f"{r['step_ms_idle']:.0f}" if r["step_ms_idle"] is not None else "-"
        print(f"{mode:<11}{r['blocked_s_median']:>17.3f} / {r['blocked_s_max']:<6.3f}{r['durable_s_median']:>11.2f}"
              f"{writing:>17} / {idle:<6}")
    os.makedirs(args.out, exist_ok=True)
    tag = f"{args.model.replace('/', '_')}_{args.resolution}_zero{args.zero_stage}"
    path = os.path.join(args.out, f"checkpoint_{tag}.json")
    with open(path, "w") as f:
        json.dump({"args": vars(args), "overrides": overrides, "results": results}, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
