"""Checkpoints: DeepSpeed engine shards + EMA + per-rank state + trainer metadata, atomic `latest`.

    <checkpoint root>/step_000001000/      root: <run dir>/checkpoints, or checkpoint.uri (a folder or s3://…)
        engine/                 DeepSpeed's save_checkpoint(tag="engine"): ZeRO shards of weights + optimizer + lr
        ema.safetensors         gathered fp32 EMA (written by rank 0)
        rank_00000.pt …         per rank: data position, RNG states (torch, CUDA, numpy, python)
        trainer.json            step, resolved config, world size, model kwargs, data geometry, tracking run id
    <checkpoint root>/latest    the name of the newest *complete* checkpoint folder

How a save works (dig/train/checkpoint_writer.py): the training loop waits only while the state is copied to host
memory; a background thread writes and fsyncs every file (and folder), uploads it when the root is on S3, and the
ranks then compare notes. Only when every rank's part is durable does rank 0 replace `latest` (temporary file,
fsync, rename, folder fsync; on S3 one PUT). A crash mid-save leaves the previous `latest` in force; the folders
it left behind are removed when the next trainer starts. Older folders beyond `keep_last` are deleted after
`latest` moved. Files get the permissions of a plain open() under the user's umask.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
from typing import BinaryIO, Callable

import numpy as np
import torch

from dig.data.storage import FILE_MODE

CHECKPOINTS = "checkpoints"
LATEST = "latest"
ENGINE_TAG = "engine"
EMA_FILE = "ema.safetensors"
TRAINER_FILE = "trainer.json"
STEP_PREFIX = "step_"


def step_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:09d}"


def step_dir(run_dir: str, step: int) -> str:
    return os.path.join(run_dir, CHECKPOINTS, step_name(step))


def rank_file(ckpt: str, rank: int) -> str:
    return os.path.join(ckpt, f"rank_{rank:05d}.pt")


def latest_checkpoint(run_dir: str) -> str | None:
    """The newest complete checkpoint folder of a run, or None."""
    return latest_in(os.path.join(run_dir, CHECKPOINTS))


def latest_in(root: str) -> str | None:
    """The newest complete checkpoint folder under a local checkpoint root, or None."""
    marker = os.path.join(root, LATEST)
    if not os.path.exists(marker):
        return None
    with open(marker) as f:
        name = f.read().strip()
    path = os.path.join(root, name)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{marker} names {name}, which does not exist")
    return path


def resolve_checkpoint(path: str) -> str:
    """A run directory (→ its latest), a checkpoint root such as a local checkpoint.uri (→ its latest) or a
    checkpoint folder → the checkpoint folder."""
    if os.path.exists(os.path.join(path, TRAINER_FILE)):
        return path
    found = latest_checkpoint(path) or latest_in(path)
    if found is None:
        raise FileNotFoundError(f"{path} is neither a checkpoint folder nor a run directory with a checkpoint")
    return found


def fsync_path(path: str) -> None:
    """fsync a file, or a folder (its entries: what a rename or a new file changed in it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _replacing(path: str):
    """Yields a temporary sibling of `path` to write; then renames it over `path` and fsyncs the folder (the
    caller has synced the file). On an error the temporary file is removed and `path` is untouched."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".tmp-{os.getpid()}-{os.path.basename(path)}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_path(folder)


def write_durable(path: str, write: Callable[[BinaryIO], None]) -> None:
    """Write through `write(file)` to a temporary sibling, fsync it, rename it over `path` and fsync the folder:
    after return the file is on stable storage, and a reader sees either nothing/the old file or all of it. The
    file gets the mode a plain open() would give under the user's umask (not mkstemp's 0600)."""
    with _replacing(path) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)  # the umask applies
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())


def write_safetensors(path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """safetensors file written like `write_durable` (safetensors' own save_file writes in place)."""
    from safetensors.torch import save_file

    with _replacing(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)
        os.chmod(tmp, FILE_MODE)
        fsync_path(tmp)


def _atomic_write_text(path: str, text: str) -> None:
    write_durable(path, lambda f: f.write(text.encode()))


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


def checkpoint_names(root: str) -> list[str]:
    """Sorted names of the step folders under a local checkpoint root (complete or not)."""
    if not os.path.isdir(root):
        return []
    return sorted(d for d in os.listdir(root) if d.startswith(STEP_PREFIX) and os.path.isdir(os.path.join(root, d)))


def prune(run_dir: str, keep_last: int, drop_unfinished: bool = True) -> None:
    prune_root(os.path.join(run_dir, CHECKPOINTS), keep_last, drop_unfinished)


def prune_root(root: str, keep_last: int, drop_unfinished: bool = True) -> None:
    """Keep the `keep_last` newest complete folders (always `latest`). With `drop_unfinished`, also folders past
    `latest`: leftovers of a save that died before `latest` moved — only safe while no save is in flight."""
    current = latest_in(root)
    current_name = os.path.basename(current) if current else None
    folders = checkpoint_names(root)
    stale = [n for n in folders if current_name is None or n > current_name] if drop_unfinished else []
    complete = [n for n in folders if current_name is not None and n <= current_name]
    for name in stale + complete[::-1][max(keep_last, 1):]:
        if name != current_name:
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    for leftover in os.listdir(root) if drop_unfinished and os.path.isdir(root) else []:
        if leftover.startswith(".tmp-"):
            os.unlink(os.path.join(root, leftover))


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
