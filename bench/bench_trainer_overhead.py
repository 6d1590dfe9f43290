"""Overhead of the full `dig train` step over the bare model step, side by side in one process.

  trainer: dig.train.trainer.Trainer on synthetic shards in the real format: DeepSpeed engine (ZeRO stage as
           configured), bf16 on GPU, the shard reader with its prefetch threads, EMA, the metric window and the
           periodic metric logging (MLflow replaced by the no-op tracker: the GPU machine has no MLflow; its
           cost is an HTTP call every `log_every` steps, off the GPU). No checkpoints, no sample grids.
  bare:    the same model, batch, diffusion loss and precision as a plain loop: fp32 params, bf16 autocast,
           fused AdamW, grad clipping; the batch already on the device.

    python -m bench.bench_trainer_overhead --model DiG-B/2 --resolution 256 --batch 64 --steps 30
    python -m bench.bench_trainer_overhead --quick        # CPU dry run at a tiny size

Prints a table (median ms/step, img/s, overhead %) and writes results.json under --out.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bare_step_times(name: str, kwargs: dict, batch: int, steps: int, warmup: int, device: torch.device,
                    bf16: bool, lr: float) -> list[float]:
    from dig.diffusion import create_diffusion
    from dig.models import create_model

    torch.manual_seed(0)
    model = create_model(name, **kwargs).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, fused=device.type == "cuda")
    diffusion = create_diffusion()
    h, w = model.latent_hw
    x = torch.randn(batch, model.in_channels, h, w, device=device)
    y = torch.randint(0, model.num_classes, (batch,), device=device)
    times = []
    for _ in range(warmup + steps):
        _sync(device)
        t0 = time.perf_counter()
        t = torch.randint(0, diffusion.num_timesteps, (batch,), device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = diffusion.training_losses(model, x, t, model_kwargs=dict(y=y))["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss.item()  # the trainer reads its loss back every step too
        _sync(device)
        times.append(time.perf_counter() - t0)
    del model, opt
    return times[warmup:]


def trainer_step_times(name: str, overrides: dict, resolution: int, batch: int, steps: int, warmup: int,
                       zero_stage: int, workdir: str, log_every: int) -> tuple[list[float], torch.device]:
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
    num_shards = max(2, -(-(warmup + steps + 4) * batch // per_shard))
    data = os.path.join(workdir, "latents")
    write_synthetic_dataset(data, num_shards=num_shards, samples_per_shard=per_shard, latent_size=latent,
                            resolution=resolution, num_classes=1000, dtype="float16")
    base = {
        "run": {"name": "bench", "dir": os.path.join(workdir, "run")},
        "model": {"name": name, "overrides": overrides},
        "data": {"path": data, "resolution": resolution, "global_batch_size": batch, "micro_batch_size": batch},
        "engine": {"zero_stage": zero_stage},
        "steps": warmup + steps, "checkpoint": {"every": 0},
        "tracking": {"log_every": log_every, "sample_every": 0},
    }
    resolved = resolve(base=base)
    cfg = validate(resolved)
    trainer_module.make_tracker = lambda *a, **k: NullTracker()
    tr = trainer_module.Trainer(cfg, resolved)
    device = tr.rt.device
    times = []
    for _ in range(warmup + steps):
        _sync(device)
        t0 = time.perf_counter()
        metrics = tr.train_step()
        tr.step += 1
        tr.update_ema()
        tr._window.add(metrics, time.perf_counter() - t0)
        tr.maybe_log_metrics()
        _sync(device)
        times.append(time.perf_counter() - t0)
    tr.data.close()
    from dig.train.engine import shutdown

    shutdown()
    return times[warmup:], device


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
    p.add_argument("--quick", action="store_true", help="CPU dry run: tiny model, few steps")
    a = p.parse_args(argv)
    overrides: dict = {}
    if a.quick:
        a.model, a.resolution, a.batch, a.steps, a.warmup = "DiG-S/2", 64, 4, 3, 1
        overrides = {"depth": 2, "hidden_size": 64, "num_heads": 2}

    with tempfile.TemporaryDirectory() as work:
        trainer_times, device = trainer_step_times(a.model, overrides, a.resolution, a.batch, a.steps, a.warmup,
                                                   a.zero_stage, work, a.log_every)
        torch.cuda.empty_cache() if device.type == "cuda" else None
        kwargs = dict(input_size=a.resolution // 8, num_classes=1000, **overrides)
        bare_times = bare_step_times(a.model, kwargs, a.batch, a.steps, a.warmup, device,
                                     bf16=device.type == "cuda", lr=1e-4)

    rows = []
    for label, times in (("bare model step", bare_times), (f"dig train step (ZeRO-{a.zero_stage})", trainer_times)):
        med = statistics.median(times)
        rows.append({"step": label, "median_ms": med * 1e3, "img_per_s": a.batch / med})
    overhead = rows[1]["median_ms"] / rows[0]["median_ms"] - 1
    result = {"model": a.model, "resolution": a.resolution, "batch": a.batch, "steps": a.steps,
              "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "rows": rows, "overhead": overhead,
              "trainer_ms": [t * 1e3 for t in trainer_times], "bare_ms": [t * 1e3 for t in bare_times]}
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "trainer_overhead.json"), "w") as f:
            json.dump(result, f, indent=1)
    print(f"\n{a.model} {a.resolution}px batch {a.batch}, {a.steps} timed steps after {a.warmup} warm-up, "
          f"{result['device']}")
    print(f"{'step':<28}{'median ms':>12}{'img/s':>10}")
    for r in rows:
        print(f"{r['step']:<28}{r['median_ms']:>12.1f}{r['img_per_s']:>10.1f}")
    print(f"overhead of the full trainer step: {overhead * 100:+.1f}%")


if __name__ == "__main__":
    main()
