"""Resume a run on another number of ranks (N → M): engine state through DeepSpeed's universal checkpoint, data
position re-dealt, EMA and trainer counters carried, RNG re-seeded.

What moves how, from a checkpoint written by N ranks (dig/train/checkpoint.py) to M ranks:
  * weights, optimizer state (AdamW moments, step), lr schedule, engine step counters: the engine's ZeRO shards
    (without ZeRO, engine.zero_stage=0, every rank's file holds them whole: DeepSpeed loads it as it is)
    are converted once into DeepSpeed's *universal* checkpoint (one fp32 / exp_avg / exp_avg_sq file per
    parameter; `deepspeed.checkpoint.ds_to_universal`, in a subprocess of rank 0) in `<checkpoint>/universal/`,
    and the M-rank engine, built with `checkpoint.load_universal`, cuts its own partitions out of it. This works
    for ZeRO-1, 2 and 3 and fp32/bf16 alike. The conversion is written to a temporary folder and renamed, so an
    interrupted conversion is redone, and a finished one is reused by a later resume.
  * EMA: `ema.safetensors` is whole already; each rank cuts its part (ShardedEMA.load_full).
  * data position: the reader deals the current epoch's unconsumed samples to the M ranks
    (LatentShardReader.redealt_state, from all N ranks' saved positions).
  * RNG (timesteps, noise, label dropout): the old per-rank streams belong to ranks that no longer exist; every new
    rank's torch/CUDA/numpy/python generators are seeded from (run.seed, step, rank, world size), so the resumed
    run is deterministic. (The data's draws are keyed by sample, not by rank, and do not change.)
  * step, non-finite counters: the same on every old rank; taken from rank 0.
The global batch stays what the config says; M must divide it into micro-batches (`check_world`).
"""
from __future__ import annotations

import glob
import logging
import os
import random
import shutil
import subprocess
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

from . import checkpoint
from .config import ConfigError, TrainConfig

log = logging.getLogger("dig.train")

UNIVERSAL_TAG = "universal"   # <checkpoint>/universal/: the engine state in DeepSpeed's universal layout


def saved_world_size(ckpt: str) -> int:
    return int(checkpoint.load_trainer_meta(ckpt)["world_size"])


def needs_reshard(ckpt: str | None, world_size: int) -> bool:
    return ckpt is not None and saved_world_size(ckpt) != world_size


def check_world(cfg: TrainConfig, ckpt: str, world_size: int) -> None:
    """The configured global batch must split into whole micro-batches on the new world size; say what would."""
    g, b = cfg.data.global_batch_size, cfg.data.micro_batch_size
    if g % (world_size * b) == 0:
        return
    micro = [d for d in range(1, g // world_size + 1) if g % (world_size * d) == 0]
    worlds = [w for w in range(1, g // b + 1) if g % (w * b) == 0]
    hint = (f"set data.micro_batch_size to one of {micro}" if micro
            else f"no micro-batch size fits: {world_size} does not divide {g}")
    raise ConfigError(
        f"cannot resume {ckpt} (written by {saved_world_size(ckpt)} ranks) on {world_size} ranks: "
        f"data.global_batch_size={g} is not divisible by {world_size} ranks x data.micro_batch_size={b}; keep the "
        f"global batch and {hint}, or use a world size that divides it with micro-batch {b}: {worlds}")


def universal_folder(ckpt: str) -> str:
    return os.path.join(ckpt, UNIVERSAL_TAG)


def convert_to_universal(ckpt: str, workers: int | None = None) -> str:
    """The engine state of `ckpt` in DeepSpeed's universal layout (converted now unless done before).
    Not collective: call it from one process."""
    out = universal_folder(ckpt)
    if os.path.isdir(out):
        return out
    for stale in glob.glob(os.path.join(ckpt, f".{UNIVERSAL_TAG}.tmp-*")):
        shutil.rmtree(stale, ignore_errors=True)   # a conversion that was interrupted
    tmp = os.path.join(ckpt, f".{UNIVERSAL_TAG}.tmp-{os.getpid()}")
    workers = workers or max(1, min(8, (os.cpu_count() or 2) // 2))
    # A fresh interpreter: the conversion forks workers, which must not inherit CUDA/NCCL state.
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
           "--input_folder", os.path.join(ckpt, checkpoint.ENGINE_TAG), "--output_folder", tmp,
           "--num_extract_workers", str(workers), "--num_merge_workers", str(workers),
           "--inject_missing_state"]   # ZeRO-1/2 checkpoints of a plain module lack DeepSpeed's "universal info"
    log_path = os.path.join(ckpt, f".{UNIVERSAL_TAG}-conversion.log")
    t0 = time.monotonic()
    with open(log_path, "wb") as out_log:
        rc = subprocess.call(cmd, stdout=out_log, stderr=subprocess.STDOUT)
    # ds_to_universal writes a `latest_universal` marker beside its output; this trainer names the folder itself
    marker = os.path.join(ckpt, "latest_universal")
    if os.path.exists(marker):
        os.remove(marker)
    if rc != 0:
        with open(log_path, errors="replace") as f:
            tail = f.read()[-3000:]
        shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(f"converting {ckpt}/{checkpoint.ENGINE_TAG} to DeepSpeed's universal checkpoint failed "
                           f"(exit {rc}); log {log_path}:\n{tail}")
    os.replace(tmp, out)
    os.remove(log_path)
    log.info("converted %s to a universal checkpoint in %.1f s", ckpt, time.monotonic() - t0)
    return out


def prepare_universal(ckpt: str) -> None:
    """Collective: rank 0 converts (once), every rank learns the outcome (an error is raised on every rank)."""
    error = None
    if dist.get_rank() == 0:
        try:
            convert_to_universal(ckpt)
        except Exception as exc:  # noqa: BLE001 - sent to every rank, raised there
            error = str(exc)
    message = [error]
    dist.broadcast_object_list(message, src=0)
    if message[0] is not None:
        raise RuntimeError(message[0])


def uses_universal(cfg: TrainConfig) -> bool:
    """Under ZeRO-1/2/3 the optimizer state is partitioned by rank and needs the universal layout; without ZeRO
    (stage 0) every rank holds it whole and DeepSpeed's own checkpoint loads on any number of ranks."""
    return cfg.engine.zero_stage > 0


def load_engine(engine, ckpt: str) -> None:
    """Load the engine state of `ckpt` (written by any number of ranks) into this engine."""
    if not engine.zero_optimization():
        checkpoint.load_engine(engine, ckpt)
        return
    if not engine.load_universal_checkpoint():
        raise RuntimeError("the engine must be built with load_universal=True to resume on another world size")
    prepare_universal(ckpt)
    path, _ = engine.load_checkpoint(ckpt, tag=UNIVERSAL_TAG, load_module_strict=True, load_optimizer_states=True,
                                     load_lr_scheduler_states=True)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load the universal checkpoint {universal_folder(ckpt)}")
    place_optimizer_steps(engine.optimizer)


def place_optimizer_steps(optimizer) -> None:
    """DeepSpeed's ZeRO-3 universal load gives every AdamW state the `step` tensor it read from disk, on the CPU;
    torch's fused and capturable AdamW need it on the parameter's device (the fused CUDA kernel refuses a CPU step)."""
    inner = getattr(optimizer, "optimizer", optimizer)   # DeepSpeed's ZeRO optimizer wraps torch's
    # ZeRO-3 leaves the groups' `params` empty between steps (it puts each sub-group's partition in at step time),
    # so the states are found through `state`, not through the groups.
    if not any(group.get("fused") or group.get("capturable") for group in inner.param_groups):
        return
    for param, state in inner.state.items():
        step = state.get("step")
        if torch.is_tensor(step) and step.device != param.device:
            state["step"] = step.to(device=param.device, dtype=torch.float32)


def rank_seed(seed: int, step: int, rank: int, world_size: int) -> int:
    return int(np.random.SeedSequence([seed, step, rank, world_size, 0x5E5A]).generate_state(1, np.uint64)[0]
               >> 1)


def fresh_rng_state(seed: int) -> dict:
    """RNG states (checkpoint.rng_state's layout) of generators seeded with `seed`."""
    state = {"torch": torch.Generator().manual_seed(seed).get_state(),
             "numpy": np.random.RandomState(seed % 2 ** 32).get_state(),
             "python": random.Random(seed).getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.Generator(device="cuda").manual_seed(seed).get_state()
    return state


def load_rank_state(ckpt: str, rank: int, world_size: int, reader, seed: int) -> dict:
    """This new rank's state (checkpoint.load_rank_state's layout) from the states of all old ranks."""
    old_world = saved_world_size(ckpt)
    # weights_only=False: the files hold numpy/python RNG states, written by this trainer
    old = [torch.load(checkpoint.rank_file(ckpt, q), weights_only=False) for q in range(old_world)]
    data = reader.redealt_state([s["data"] for s in old])
    step = old[0]["step"]
    if rank == 0:
        log.info("resuming %s (written by %d ranks) on %d ranks at step %d: epoch %d, %d samples per rank left "
                 "in it", ckpt, old_world, world_size, step, data["epoch"],
                 data["dealt"]["quota"] if data["dealt"] else 0)
    return {"data": data, "step": step, "nonfinite_total": old[0]["nonfinite_total"],
            "nonfinite_in_a_row": old[0]["nonfinite_in_a_row"],
            "rng": fresh_rng_state(rank_seed(seed, step, rank, world_size))}
