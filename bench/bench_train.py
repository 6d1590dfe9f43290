"""The path users run, timed: `python -m launch.train` (torchrun → `dig train` → DeepSpeed engine, shard reader,
EMA, metric logging, a checkpoint) on synthetic shards in the real format, per model × resolution × GPU count,
beside the bare compiled model step at the same per-GPU batch, measured in the same run.

    python -m bench.bench_train                                   # DiG-XL/2 + DiT-XL/2, 256 px, 1 GPU
    python -m bench.bench_train --models DiG-XL/2 --resolutions 256 --gpus 1,2,4 --set model.compile_mode=default
    python -m bench.bench_train --quick                           # CPU dry run of the plumbing (tiny model)
    dig bench train …                                             # the same, from the CLI

Every run trains with configs/train/dig-xl2-imagenet256.yaml (override with --config) plus: the model and
resolution of the row, `data.micro_batch_size=--batch`, global batch = batch × GPUs, `steps`, a checkpoint at
step `--checkpoint-at`, metrics every `--log-every` steps to <run dir>/metrics.jsonl (`tracking.backend=jsonl`:
the trainer's metric logging runs, without needing an MLflow server), no sample grids or FID; `--set key=value` adds
training-config overrides to every run. Independent one-GPU runs may share a multi-GPU machine (`--parallel`,
one GPU each, at once); multi-GPU runs always have the machine to themselves.

Columns: img/s per GPU from the trainer's own windows (median after `--warmup` steps; a window is the steps'
wall time, no logging or checkpoint), the same over the wall clock between log records before the checkpoint
(includes logging), the trainer's MFU (model FLOPs ÷ the GPU's dense bf16 spec) and the same against the bf16
matmul rate measured here, peak GPU memory, the seconds the checkpoint stopped training, the bare compiled step's
img/s at the same batch (bench.bench_trainer_overhead --bare-only, a separate process on one GPU) and the ratio
trainer ÷ bare. Results: a table on stdout and bench_train.json under --out.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}


def write_dataset(folder: str, resolution: int, samples: int, classes: int) -> None:
    from dig.data.synthetic import write_synthetic_dataset

    per_shard = 256
    write_synthetic_dataset(folder, num_shards=max(2, -(-samples // per_shard)), samples_per_shard=per_shard,
                            latent_size=resolution // 8, resolution=resolution, num_classes=classes,
                            dtype="float16")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Job:
    def __init__(self, kind: str, model: str, res: int, gpus: int, command: list[str], env: dict, log: str,
                 result: str, variant: str = ""):
        self.kind, self.model, self.res, self.gpus, self.variant = kind, model, res, gpus, variant
        self.command, self.env, self.log, self.result = command, env, log, result
        self.proc: subprocess.Popen | None = None
        self.devices: list[int] = []
        self.seconds = 0.0
        self.rc: int | None = None


def run_jobs(jobs: list[Job], total_gpus: int, parallel: bool, timeout_s: float, on_done=lambda: None) -> None:
    """One-GPU jobs run side by side on free GPUs when `parallel`; a multi-GPU job waits for an idle machine.
    Without GPUs (CPU, gloo) a job's processes need no device: jobs run one after another."""
    slots = total_gpus or max((job.gpus for job in jobs), default=1)
    if any(job.gpus > slots for job in jobs):
        raise ValueError(f"a job needs more than the {slots} GPUs of this machine")
    pending, running, free = list(jobs), [], list(range(slots))
    while pending or running:
        for job in list(running):
            if job.proc.poll() is not None or time.time() - job.started > timeout_s:
                if job.proc.poll() is None:
                    job.proc.kill()
                job.rc = job.proc.wait()
                job.seconds = time.time() - job.started
                free += job.devices
                running.remove(job)
                print(f"  done  {job.kind:<5} {job.model} {job.variant} {job.res}px {job.gpus} GPU: rc={job.rc} "
                      f"{job.seconds:.0f}s", flush=True)
                on_done()
        for job in list(pending):  # in order: a job that cannot start yet holds back the ones behind it
            alone = job.gpus > 1 or not parallel
            if len(free) < job.gpus or (alone and running) or (running and running[0].gpus > 1):
                break
            job.devices, free = free[:job.gpus], free[job.gpus:]
            env = {**os.environ, **job.env}
            if total_gpus:
                env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, job.devices))
            job.started = time.time()
            with open(job.log, "w") as log:
                job.proc = subprocess.Popen(job.command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
            pending.remove(job)
            running.append(job)
            print(f"  start {job.kind:<5} {job.model} {job.variant} {job.res}px {job.gpus} GPU on {job.devices}",
                  flush=True)
            if alone:
                break
        time.sleep(0.5)


def summarise_run(metrics_file: str, gpus: int, batch: int, warmup: int, checkpoint_at: int) -> dict:
    records = []
    if os.path.exists(metrics_file):
        with open(metrics_file) as f:
            records = [r for r in map(json.loads, f) if "step" in r]
    steady = [r for r in records if r["step"] > warmup]
    if not steady:
        return {"error": f"no metrics after step {warmup} in {metrics_file}"}
    out = {"img_per_s_per_gpu": statistics.median(r["img_per_sec"] for r in steady) / gpus}
    before = [r for r in records if r["step"] >= warmup and r["step"] <= checkpoint_at]
    if len(before) >= 2:
        span = before[-1]["time"] - before[0]["time"]
        out["wall_img_per_s_per_gpu"] = (before[-1]["step"] - before[0]["step"]) * batch * gpus / span / gpus
    if any("mfu" in r for r in steady):
        out["mfu"] = statistics.median(r["mfu"] for r in steady if "mfu" in r)
    if any("gpu_mem_max_gib" in r for r in records):
        # the trainer resets the maximum at every log: peak_gib includes the warm-up (compiles, graph captures),
        # steady_gib only the intervals after it
        out["peak_gib"] = max(r.get("gpu_mem_max_gib", 0.0) for r in records)
        out["steady_gib"] = max(r.get("gpu_mem_max_gib", 0.0) for r in steady)
    blocks = [r["checkpoint_block_s"] for r in records if "checkpoint_block_s" in r]
    if blocks:
        out["checkpoint_block_s"] = max(blocks)
    out["loss_last"] = records[-1].get("loss")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="DiG-XL/2,DiT-XL/2")
    p.add_argument("--resolutions", default="256")
    p.add_argument("--gpus", default="1", help="GPU counts, e.g. 1,2,4: for the first model at the first resolution "
                   "(the others run on one GPU) unless --all-gpu-counts")
    p.add_argument("--all-gpu-counts", action="store_true", help="every model and resolution at every GPU count")
    p.add_argument("--bare-all", action="store_true", help="bare steps at every resolution (default: the first)")
    p.add_argument("--batch", type=int, default=32, help="images per GPU (the paper: 32)")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=15, help="steps left out of the medians (compile, warm-up)")
    p.add_argument("--log-every", type=int, default=5)
    p.add_argument("--checkpoint-at", type=int, default=30, help="the step that writes the measured checkpoint")
    p.add_argument("--config", default="configs/train/dig-xl2-imagenet256.yaml")
    p.add_argument("--set", action="append", default=[], dest="settings", metavar="KEY=VALUE",
                   help="training-config override for every run (e.g. engine.zero_stage=2)")
    p.add_argument("--extra", action="append", default=[], metavar="LABEL[@GPUS]:KEY=VALUE[,KEY=VALUE...]",
                   help="an extra run of the first model at the first resolution with these overrides, on one GPU "
                        "or GPUS (e.g. zero3:engine.zero_stage=3,engine.precision=bf16 or "
                        "no-overlap@2:engine.overlap_grad_allreduce=false)")
    p.add_argument("--no-bare", action="store_true", help="skip the bare compiled step")
    p.add_argument("--bare-mode", default="default",
                   help="torch.compile mode of the bare step's blocks (default, reduce-overhead = CUDA graphs)")
    p.add_argument("--parallel", action="store_true", help="run one-GPU jobs side by side on a multi-GPU machine")
    p.add_argument("--timeout", type=float, default=900, help="seconds per job before it is killed")
    p.add_argument("--out", default=None, help="folder for bench_train.json and the runs' logs")
    p.add_argument("--quick", action="store_true", help="CPU dry run: tiny DiG, a few steps")
    a = p.parse_args(argv)

    import torch

    from bench.common import matmul_peak_tflops

    cuda = torch.cuda.is_available()
    total_gpus = torch.cuda.device_count() if cuda else 0
    models, resolutions = a.models.split(","), [int(r) for r in a.resolutions.split(",")]
    gpu_counts = [int(g) for g in a.gpus.split(",")]
    settings = list(a.settings)
    if a.quick:
        models, resolutions, gpu_counts = ["DiG-S/2"], [64], [1]
        a.batch, a.steps, a.warmup, a.log_every, a.checkpoint_at, a.no_bare = 2, 6, 2, 1, 4, True
        settings += ["model.overrides={depth: 2, hidden_size: 64, num_heads: 2}", "model.num_classes=10",
                     "engine.zero_stage=3", "engine.precision=fp32", "model.compile=false"]
    extras = []  # (label, GPUs, overrides)
    for extra in a.extra:
        label, _, sets = extra.partition(":")
        label, _, gpus = label.partition("@")
        if gpus and not gpus.isdigit():
            p.error(f"--extra {extra!r}: the GPU count after @ must be a number")
        extras.append((label, int(gpus or 1), [x for x in sets.split(",") if x]))
        if cuda and extras[-1][1] > total_gpus:
            print(f"bench_train: --extra {extra!r} asks for {gpus} GPUs, {total_gpus} visible", file=sys.stderr)
            return 2
    most_gpus = max(gpu_counts + [gpus for _, gpus, _ in extras])
    if cuda and max(gpu_counts) > total_gpus:
        print(f"bench_train: --gpus asks for {max(gpu_counts)} GPUs, {total_gpus} visible", file=sys.stderr)
        return 2
    peak_measured = matmul_peak_tflops(torch.device("cuda")) if cuda else None
    gpu_name = torch.cuda.get_device_name() if cuda else "cpu"
    spec = next((v for k, v in SPEC_TFLOPS.items() if k in gpu_name), None)
    if cuda:
        torch.cuda.empty_cache()

    out = a.out or tempfile.mkdtemp(prefix="bench-train-")
    os.makedirs(out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="bench-train-work-")
    jobs: list[Job] = []
    for res in resolutions:
        data = os.path.join(work, f"latents{res}")
        write_dataset(data, res, samples=(a.steps + 2) * a.batch * most_gpus, classes=10 if a.quick else 1000)
        for model in models:
            tag = f"{model.replace('/', '_')}_{res}"
            if not a.no_bare and (a.bare_all or res == resolutions[0]):
                jobs.append(Job("bare", model, res, 1, [
                    sys.executable, "-m", "bench.bench_trainer_overhead", "--bare-only", "--model", model,
                    "--resolution", str(res), "--batch", str(a.batch), "--steps", "15", "--warmup", "6",
                    "--bare-compile-mode", a.bare_mode, "--json", os.path.join(out, f"bare_{tag}.json")],
                    {}, os.path.join(out, f"bare_{tag}.log"), os.path.join(out, f"bare_{tag}.json")))
            counts = gpu_counts if a.all_gpu_counts or (model, res) == (models[0], resolutions[0]) else [1]
            variants = [("", gpus, []) for gpus in counts]
            if model == models[0] and res == resolutions[0]:
                variants += extras
            for label, gpus, extra_sets in variants:
                name = f"{tag}_{gpus}gpu{'_' + label if label else ''}"
                run_dir = os.path.join(work, f"run_{name}")
                overrides = [f"model.name={model}", f"data.path={data}", f"data.resolution={res}",
                             f"data.micro_batch_size={a.batch}", f"data.global_batch_size={a.batch * gpus}",
                             f"run.dir={run_dir}", f"steps={a.steps}", f"checkpoint.every={a.checkpoint_at}",
                             "checkpoint.keep_last=1", "tracking.backend=jsonl", f"tracking.log_every={a.log_every}",
                             "tracking.sample_every=0", "tracking.eval_every=0", *settings, *extra_sets]
                env = {"GPUS_PER_NODE": str(gpus), "MASTER_PORT": str(free_port()), "PYTHONUNBUFFERED": "1"}
                jobs.append(Job("train", model, res, gpus,
                                [sys.executable, "-m", "launch.train", "--config", a.config, "--", *overrides], env,
                                os.path.join(out, f"train_{name}.log"), os.path.join(run_dir, "metrics.jsonl"),
                                variant=label))
    # first model at the first resolution (bare, then every GPU count), then the other rows, extras, other bares
    first = (models[0], resolutions[0])
    jobs.sort(key=lambda j: (0 if (j.model, j.res) == first and not j.variant else 2 if j.kind == "bare" else 1))
    print(f"bench_train: {len(jobs)} jobs on {gpu_name} x{total_gpus}; logs in {out}", flush=True)
    context = dict(a=a, settings=settings, out=out, gpu_name=gpu_name, total_gpus=total_gpus, spec=spec,
                   peak_measured=peak_measured)
    try:
        run_jobs(jobs, total_gpus, a.parallel, a.timeout, on_done=lambda: summarise(jobs, **context))
        return summarise(jobs, **context, final=True)
    finally:
        import shutil

        shutil.rmtree(work, ignore_errors=True)  # synthetic shards and run dirs (checkpoints of up to ~11 GB)


def summarise(jobs: list[Job], *, a, settings, out, gpu_name, total_gpus, spec, peak_measured,
              final: bool = False) -> int:
    """Rows from the finished jobs → bench_train.json (rewritten as jobs finish) and, at the end, the table."""
    from bench.common import versions

    bare = {}
    for job in jobs:
        if job.kind == "bare" and job.rc == 0 and os.path.exists(job.result):
            with open(job.result) as f:
                bare[(job.model, job.res)] = json.load(f)
    rows = []
    for job in jobs:
        if job.kind != "train" or job.rc is None:
            continue
        row = {"model": job.model, "variant": job.variant, "res": job.res, "gpus": job.gpus, "batch/GPU": a.batch,
               "rc": job.rc,
               "seconds": round(job.seconds)}
        row.update(summarise_run(job.result, job.gpus, a.batch, a.warmup, a.checkpoint_at))
        if os.path.exists(job.result):  # keep the run's own metric records beside the summary
            import shutil

            row["metrics_file"] = os.path.basename(job.log).replace("train_", "metrics_").replace(".log", ".jsonl")
            shutil.copyfile(job.result, os.path.join(out, row["metrics_file"]))
        if "mfu" in row and spec and peak_measured:
            row["mfu_measured_peak"] = row["mfu"] * spec / peak_measured
        ref = bare.get((job.model, job.res))
        if ref:
            row["bare_img_per_s"] = ref["img_per_s"]
            if "img_per_s_per_gpu" in row:
                row["trainer/bare"] = row["img_per_s_per_gpu"] / ref["img_per_s"]
        rows.append(row)
    one_gpu = {(r["model"], r["res"]): r.get("img_per_s_per_gpu") for r in rows if r["gpus"] == 1 and not r["variant"]}
    for r in rows:
        base = one_gpu.get((r["model"], r["res"]))
        if base and r.get("img_per_s_per_gpu") and r["gpus"] > 1:
            r["scaling_vs_1gpu"] = r["img_per_s_per_gpu"] / base
    result = {"versions": versions(), "gpu": gpu_name, "gpus_visible": total_gpus,
              "matmul_peak_tflops_measured": peak_measured, "spec_tflops": spec, "config": a.config,
              "settings": settings, "steps": a.steps, "warmup": a.warmup, "rows": rows,
              "bare": {f"{m} {r}": v for (m, r), v in bare.items()}}
    with open(os.path.join(out, "bench_train.json"), "w") as f:
        json.dump(result, f, indent=1)
    if not final:
        return 0

    cols = ["model", "variant", "res", "gpus", "img_per_s_per_gpu", "wall_img_per_s_per_gpu", "mfu", "mfu_measured_peak",
            "peak_gib", "steady_gib", "checkpoint_block_s", "bare_img_per_s", "trainer/bare", "scaling_vs_1gpu", "rc"]
    print(f"\n`dig train` vs the bare compiled step ({a.bare_mode}), {a.batch} images/GPU, {gpu_name}, measured bf16 "
          f"peak {peak_measured and round(peak_measured)} TFLOP/s; settings {settings}")
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(f"{r[c]:.3g}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in cols))
    failed = [j for j in jobs if j.rc != 0]
    for j in failed:
        print(f"FAILED {j.kind} {j.model} {j.res}px {j.gpus} GPU (rc {j.rc}); log: {j.log}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
