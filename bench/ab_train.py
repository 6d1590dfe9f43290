"""`dig train`'s step for two or more configurations timed against each other in rounds, in one process: the
trainer-level counterpart of bench.ab_step.

    python3 -m bench.ab_train --runs "DiG-XL/2,DiG-XL/2+mlp_kernel=false,DiT-XL/2" --res 256 --batch 32
    python3 -m bench.ab_train --runs "DiG-XL/2,DiG-XL/2" --set-run 2:engine.ema_side_stream=false
    python3 -m bench.ab_train --quick      # CPU: a tiny DiG against itself with an override (checks the plumbing)
    dig bench ab-train …                   # the same, from the CLI

Why. bench.bench_train runs each configuration as a `dig train` job of its own, one after the other. Between jobs
and calls the same configuration's img/s moved 2-3 %, and the same step's time up to 6 % between calls
(BENCHMARKS.md, 2026-11-30, fourteenth session), so it could not resolve the 2.4 % that bench.ab_step's rounds
measured for the bare step. Here every configuration is a Trainer (dig.train.trainer, what `dig train` runs: the
recipe's engine and precision, the compiled blocks, the shard reader on synthetic shards in the real format, the
diffusion loss, EMA, host pacing), all built in this process and warmed up first; then each round runs
--steps-per-round steps of every trainer (after --settle untimed ones) between two device synchronisations, in an
order that rotates from round to round. A configuration's time is the median over rounds; its ratio to the first
is the median of the per-round ratios, with their 10th-90th percentile (bench.common.paired_ratios).

RUN is a model name with `+KEY=VALUE` model overrides (bench.common.model_options); `--set KEY=VALUE` adds a
training-config override to every run (the recipe is --config, default configs/train/dig-xl2-imagenet256.yaml),
`--set-run N:KEY=VALUE` to run N only (counted from 1). Not timed: MLflow (the no-op tracker), checkpoints, sample
grids, FID, and the metric logging (log_every beyond the last step). One process, one GPU: every trainer's memory
is held at once.
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import torch

from .common import (add_round_options, check_round_options, command_line, finish_report, fmt_table,
                     labelled_models, paired_ratios, rotating_rounds, sync, versions)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK_MODEL = "DiG-S/2+depth=2+hidden_size=64+num_heads=2"
QUICK_SETTINGS = ["model.compile=false", "engine.precision=fp32", "data.prefetch=false"]


def model_override_settings(overrides: dict) -> list[str]:
    """{"mlp_kernel": False} -> ["model.overrides.mlp_kernel=false"]."""
    return [f"model.overrides.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in overrides.items()]


def build_trainer(name: str, overrides: dict, settings: list[str], config: str, data: str, res: int, batch: int,
                  run_dir: str, steps: int):
    from dig.train import trainer as trainer_module
    from dig.train.config import resolve, validate
    from dig.train.tracking import NullTracker

    dotted = [f"model.name={name}", *model_override_settings(overrides), f"data.path={data}",
              f"data.resolution={res}", f"data.micro_batch_size={batch}", f"data.global_batch_size={batch}",
              f"run.dir={run_dir}", f"steps={steps}", "checkpoint.every=0", f"tracking.log_every={steps + 1}",
              "tracking.sample_every=0", "tracking.eval_every=0", *settings]
    resolved = resolve(config, dotted)
    trainer_module.make_tracker = lambda *a, **k: NullTracker()
    return trainer_module.Trainer(validate(resolved, source=config), resolved)


def timed_block(trainer, device: torch.device, settle: int, count: int) -> float:
    """ms per step over `count` of the trainer's steps between two device synchronisations, after `settle`
    untimed ones (wall time, as the trainer's own img/s: it includes the EMA on its side stream)."""
    for _ in range(settle):
        trainer.run_step()
    sync(device)
    start = time.perf_counter()
    for _ in range(count):
        trainer.run_step()
    sync(device)
    return (time.perf_counter() - start) * 1e3 / count


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default="", help="comma list of RUN (MODEL[+KEY=VALUE...]); the first is the base")
    ap.add_argument("--res", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32, help="images per GPU and step (micro = global batch)")
    ap.add_argument("--config", default=os.path.join(ROOT, "configs/train/dig-xl2-imagenet256.yaml"))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="settings",
                    help="training-config override for every run")
    ap.add_argument("--set-run", action="append", default=[], metavar="N:KEY=VALUE",
                    help="training-config override for run N (from 1) only")
    add_round_options(ap, warmup=6, rounds=10, what="trainer")
    args = ap.parse_args(argv)
    if args.quick:
        args.runs = args.runs or f"{QUICK_MODEL},{QUICK_MODEL}+mlp_recompute=false"
        args.res, args.batch, args.warmup = 64, 2, 1
        args.settings = QUICK_SETTINGS + args.settings
        args.rounds = 3 if args.rounds is None else args.rounds
    check_round_options(ap, args, rounds=10)
    if not args.runs:
        ap.error("--runs is required (or --quick)")
    # the same run twice is allowed when --set-run tells them apart: then they are labelled by position
    runs = labelled_models(args.runs, "--runs", "run", by_position=bool(args.set_run),
                           hint=" (tell them apart with --set-run N:KEY=VALUE)")
    per_run: dict[int, list[str]] = {}
    for item in args.set_run:
        index, sep, setting = item.partition(":")
        if not sep or not index.isdigit() or not 1 <= int(index) <= len(runs) or "=" not in setting:
            ap.error(f"--set-run {item!r}: expected N:KEY=VALUE with N from 1 to {len(runs)}")
        per_run.setdefault(int(index), []).append(setting)

    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}.items():
        os.environ.setdefault(key, value)
    from dig.data.synthetic import write_synthetic_dataset
    from dig.train.engine import free_loopback_port, shutdown

    os.environ.setdefault("MASTER_PORT", str(free_loopback_port()))
    work = tempfile.mkdtemp(prefix="ab-train-")
    trainers = {}
    try:
        steps = args.warmup + args.rounds * (args.settle + args.steps_per_round)
        data = os.path.join(work, "latents")
        per_shard = max(args.batch, 64)  # the reader starts another epoch when the shards run out
        write_synthetic_dataset(data, num_shards=max(2, min(64, -(-(steps + 2) * args.batch // per_shard))),
                                samples_per_shard=per_shard, latent_size=args.res // 8, resolution=args.res,
                                num_classes=1000, dtype="float16")
        for i, (label, name, overrides) in enumerate(runs, start=1):
            tr = build_trainer(name, overrides, args.settings + per_run.get(i, []), args.config, data, args.res,
                               args.batch, os.path.join(work, f"run{i}"), steps)
            with tr.host_pacing:
                for _ in range(args.warmup):
                    tr.run_step()
            trainers[label] = tr
            print(f"built and warmed up {label}", flush=True)
        device = next(iter(trainers.values())).rt.device
        blocks = {label: (lambda tr=tr: timed_block(tr, device, args.settle, args.steps_per_round))
                  for label, tr in trainers.items()}
        with next(iter(trainers.values())).host_pacing:  # as `dig train` runs its steps (all runs' settings alike)
            times = rotating_rounds(blocks, args.rounds)
        base = next(iter(times))
        stats = paired_ratios(times, base)
        rows = [{"run": label, "ms": stats[label]["ms"], "min_ms": min(ms), "max_ms": max(ms),
                 "img_s": args.batch / (stats[label]["ms"] * 1e-3), f"ms / {base}": stats[label]["ratio"],
                 "p10": stats[label]["p10"], "p90": stats[label]["p90"],
                 "model_tflops_per_s": trainers[label].flops_per_image * args.batch / (stats[label]["ms"] * 1e-3)
                 / 1e12, "model_kwargs": trainers[label].model_kwargs, "res": args.res, "batch": args.batch}
                for label, ms in times.items()]
    finally:
        for tr in trainers.values():
            tr.data.close()
        shutdown()
        shutil.rmtree(work, ignore_errors=True)
    table = (f"`dig train` steps, {args.res} px, {args.batch} images per step, {device.type}: {args.rounds} rounds of "
             f"{args.steps_per_round} steps each (after {args.settle} untimed), order rotating; ratio = median of the "
             f"per-round ratios to {base}, p10-p90 their spread\n")
    ratios = (f"ms / {base}", "p10", "p90")
    shown = [{**r, **{k: f"{r[k]:.4f}" for k in ratios}} for r in rows]
    table += fmt_table(shown, ["run", "ms", "min_ms", "max_ms", "img_s", "model_tflops_per_s", *ratios])
    finish_report([table], rows, args.out, "ab_train",
                  {"versions": versions(), "command": command_line("bench.ab_train", argv), "times_ms": times,
                   "config": args.config, "settings": args.settings, "per_run_settings": per_run})


if __name__ == "__main__":
    main()
