"""Run-directory checkpoints: DeepSpeed engine shards + EMA + per-rank state + trainer metadata, atomic `latest`.

    <run dir>/checkpoints/step_000001000/
        engine/                 engine.save_checkpoint(tag="engine"): ZeRO shards of weights + optimizer + lr
        ema.safetensors         gathered fp32 EMA (written by rank 0)
        rank_00000.pt …         per rank: data position, RNG states (torch, CUDA, numpy, python)
        trainer.json            step, resolved config, world size, model kwargs, data geometry, tracking run id
    <run dir>/checkpoints/latest  the name of the newest *complete* checkpoint folder

`latest` is replaced (write to a temporary file, fsync, rename) only after a barrier that every rank reaches
once it has finished writing; a crash mid-save leaves the previous `latest` in force. Older folders beyond
`keep_last` are deleted after `latest` moved.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import tempfile

import numpy as np
import torch
import torch.distributed as dist

CHECKPOINTS = "checkpoints"
LATEST = "latest"
ENGINE_TAG = "engine"
EMA_FILE = "ema.safetensors"
TRAINER_FILE = "trainer.json"


def step_dir(run_dir: str, step: int) -> str:
    return os.path.join(run_dir, CHECKPOINTS, f"step_{step:09d}")


def rank_file(ckpt: str, rank: int) -> str:
    return os.path.join(ckpt, f"rank_{rank:05d}.pt")


def latest_checkpoint(run_dir: str) -> str | None:
    """The newest complete checkpoint folder of a run, or None."""
    marker = os.path.join(run_dir, CHECKPOINTS, LATEST)
    if not os.path.exists(marker):
        return None
    with open(marker) as f:
        name = f.read().strip()
    path = os.path.join(run_dir, CHECKPOINTS, name)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{marker} names {name}, which does not exist")
    return path


def resolve_checkpoint(path: str) -> str:
    """A run directory (→ its latest) or a checkpoint folder → the checkpoint folder."""
    if os.path.exists(os.path.join(path, TRAINER_FILE)):
        return path
    found = latest_checkpoint(path)
    if found is None:
        raise FileNotFoundError(f"{path} is neither a checkpoint folder nor a run directory with a checkpoint")
    return found


def _atomic_write_text(path: str, text: str) -> None:
    folder = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(run_dir: str, step: int, engine, ema, rank_state: dict, trainer_meta: dict, keep_last: int) -> str:
    """Collective: every rank calls it. Returns the checkpoint folder."""
    from safetensors.torch import save_file

    rank = dist.get_rank()
    ckpt = step_dir(run_dir, step)
    os.makedirs(ckpt, exist_ok=True)
    engine.save_checkpoint(ckpt, tag=ENGINE_TAG, client_state={"step": step}, save_latest=False)
    ema_full = ema.full_state_dict()
    if rank == 0:
        save_file(ema_full, os.path.join(ckpt, EMA_FILE))
        _atomic_write_text(os.path.join(ckpt, TRAINER_FILE), json.dumps({**trainer_meta, "step": step}, indent=1))
    del ema_full
    torch.save({**rank_state, "rng": rng_state(), "step": step}, rank_file(ckpt, rank))
    dist.barrier()  # every rank has finished writing its part
    if rank == 0:
        _atomic_write_text(os.path.join(run_dir, CHECKPOINTS, LATEST), os.path.basename(ckpt))
        prune(run_dir, keep_last)
    dist.barrier()
    return ckpt


def prune(run_dir: str, keep_last: int) -> None:
    root = os.path.join(run_dir, CHECKPOINTS)
    current = latest_checkpoint(run_dir)
    folders = sorted(d for d in os.listdir(root) if d.startswith("step_") and os.path.isdir(os.path.join(root, d)))
    current_name = os.path.basename(current) if current else None
    # Folders past `latest` are leftovers of a save that crashed before `latest` moved: never complete.
    stale = [n for n in folders if current_name is not None and n > current_name]
    complete = [n for n in folders if n not in stale]
    for name in stale + complete[::-1][max(keep_last, 1):]:
        if name != current_name:
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def load_trainer_meta(ckpt: str) -> dict:
    with open(os.path.join(ckpt, TRAINER_FILE)) as f:
        return json.load(f)


def load_ema_full(ckpt: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(os.path.join(ckpt, EMA_FILE))


def load_rank_state(ckpt: str, rank: int, world_size: int) -> dict:
    meta = load_trainer_meta(ckpt)
    if meta.get("world_size") != world_size:
        raise RuntimeError(f"{ckpt} was written by {meta.get('world_size')} ranks, not {world_size}: its per-rank "
                           "state must be re-dealt (dig.train.reshard.load_rank_state)")
    # weights_only=False: the file holds numpy/python RNG states, written by this trainer
    return torch.load(rank_file(ckpt, rank), weights_only=False)


def load_engine(engine, ckpt: str) -> None:
    path, _ = engine.load_checkpoint(ckpt, tag=ENGINE_TAG, load_module_strict=True, load_optimizer_states=True,
                                     load_lr_scheduler_states=True)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load the engine state from {ckpt}/{ENGINE_TAG}")
