"""Checkpoint saves that stop training only for a copy to host memory; writing, fsync and upload run behind it.

Why our own writer and not DeepSpeed's or torch's asynchronous savers: DeepSpeed 0.19's decoupled engine
(FastCheckpointEngine in a subprocess) targets its aio/GDS writers (an op to build per machine), reports a failed
write by printing in the subprocess and maintains its own `latest`; its DataStates engine needs the external
`datastates` package; neither uploads to S3 nor tells the other ranks about a failure.
torch.distributed.checkpoint.async_save needs the DCP format, which
DeepSpeed's ZeRO checkpoints (and zero_to_fp32, `dig export --weights raw`, resume) do not use. What we keep from
DeepSpeed is its checkpoint-engine hook: during `engine.save_checkpoint` a capturing engine takes each state dict
DeepSpeed would `torch.save` and copies its tensors to (pinned, reused) host buffers instead, so the files are
byte-for-byte what DeepSpeed writes, only later.

One save, on every rank:
  foreground  wait for the previous save (at most one in flight; its failure is raised here), create the folder
              (all ranks agree it worked), capture the engine state, gather the EMA (collective), serialise the
              small per-rank state. This is all the loop waits for.
  background  write + fsync every file and folder into the staging folder; upload it when the root is on S3
              (bounded, logged retries per file); then all ranks exchange their outcome over a gloo group of their
              own (a dedicated communicator, so it never interleaves with the training collectives). Only if every
              rank succeeded does rank 0 move `latest` (and tell the others whether that worked), then prune.
The outcome is identical on every rank: a failure names every failed rank and its cause. The trainer polls it
each step; on failure every rank stops together (through the stop request that travels with the loss
statistics) and raises it.
"""
from __future__ import annotations

import copy
import io
import json
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from dig.data import storage

from . import checkpoint
from .checkpoint import ENGINE_TAG, EMA_FILE, LATEST, TRAINER_FILE

log = logging.getLogger("dig.train")

DOWNLOADED_MARKER = ".downloaded"  # a local copy of a remote checkpoint that was fully fetched


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written or committed; the message names the failed ranks and causes."""


@dataclass
class SavedCheckpoint:
    step: int
    name: str
    location: str  # the complete checkpoint `latest` now names: a local folder or an s3:// prefix


# --- host snapshot of DeepSpeed's state dicts ----------------------------------------------------------------

class _HostStager:
    """Copies tensors into host buffers that are kept and reused by the next save (same traversal order, same
    shapes), pinned when the source is on a GPU so the copies are asynchronous DMA; one sync at the end."""

    def __init__(self):
        self.buffers: list[torch.Tensor] = []
        self.index = 0
        self.any_cuda = False

    def allocate(self, layout: list[tuple[torch.Size, torch.dtype, bool]], device: int | None) -> None:
        """Create the buffers of `layout` ahead of the save that uses them, in a background thread right after
        the first step. Pinning is what makes a process's first save slow (cudaHostAlloc: 1.2 GB/s on an H200
        host, bench/bench_pinning.py); it also stalls other threads' GPU work while it runs, which is why it
        overlaps the first steps' warm-up (compilation, CUDA graph recording) rather than a later step. `device`
        is the thread's CUDA device (the host allocator works in the current device's context)."""
        try:
            if device is not None:
                torch.cuda.set_device(device)
            self.buffers = [torch.empty(shape, dtype=dtype, pin_memory=pinned) for shape, dtype, pinned in layout]
        except Exception as exc:  # noqa: BLE001 - the save allocates what it needs itself (and reports failures)
            log.warning("checkpoint host buffers not prepared ahead (%s); the first save allocates them", exc)

    def reset(self) -> None:
        self.index = 0
        self.any_cuda = False

    @torch.no_grad()
    def copy(self, t: torch.Tensor) -> torch.Tensor:
        src = t.detach()
        i, self.index = self.index, self.index + 1
        buf = self.buffers[i] if i < len(self.buffers) else None
        if buf is None or buf.shape != src.shape or buf.dtype != src.dtype:
            buf = torch.empty(src.shape, dtype=src.dtype, pin_memory=src.is_cuda)
            if i < len(self.buffers):
                self.buffers[i] = buf
            else:
                self.buffers.append(buf)
        buf.copy_(src, non_blocking=src.is_cuda)
        self.any_cuda |= src.is_cuda
        out = buf.detach()
        if isinstance(t, torch.nn.Parameter):
            return torch.nn.Parameter(out, requires_grad=t.requires_grad)
        return out.requires_grad_(t.requires_grad)

    def synchronize(self) -> None:
        if self.any_cuda:
            torch.cuda.synchronize()


class _LayoutRecorder:
    """Stands in for _HostStager in a rehearsal of a save: copies nothing, notes each tensor's (shape, dtype,
    pinned) in the order the save meets them, which is what `_HostStager.allocate` needs."""

    def __init__(self):
        self.layout: list[tuple[torch.Size, torch.dtype, bool]] = []

    def copy(self, t: torch.Tensor) -> torch.Tensor:
        self.layout.append((t.shape, t.dtype, t.is_cuda))
        return t

    def synchronize(self) -> None:
        pass


_IMMUTABLE = (int, float, complex, str, bytes, bool, type(None), torch.dtype, torch.device)


def snapshot(obj, stager: _HostStager | _LayoutRecorder, memo: dict):
    """`obj` with every tensor copied to host memory and every container rebuilt, so that training may go on
    mutating the originals (optimizer state in place, lr in param_groups) while the copy is written."""
    if isinstance(obj, torch.Tensor):
        # the original is kept alive in the memo: DeepSpeed's state dicts of earlier files of this save may be
        # freed already, and a new tensor could otherwise reuse an old one's id and get its copy
        if id(obj) not in memo:
            memo[id(obj)] = (obj, stager.copy(obj))
        return memo[id(obj)][1]
    if isinstance(obj, _IMMUTABLE):
        return obj
    if isinstance(obj, dict):
        out = copy.copy(obj)
        out.clear()
        for k, v in obj.items():
            out[k] = snapshot(v, stager, memo)
        return out
    if isinstance(obj, list):
        return [snapshot(v, stager, memo) for v in obj]
    if isinstance(obj, tuple):
        items = [snapshot(v, stager, memo) for v in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    try:
        return copy.deepcopy(obj)
    except Exception:  # noqa: BLE001 - e.g. handles; DeepSpeed does not mutate such objects during training
        return obj


def _capturing_engine_class():
    from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointEngine

    class CapturingCheckpointEngine(CheckpointEngine):
        """Takes what DeepSpeed would torch.save: (path, host snapshot) pairs, written later."""

        def __init__(self, stager: _HostStager | _LayoutRecorder):
            super().__init__(None)
            self.name = "dig-capture"
            self.stager, self.memo, self.files = stager, {}, []

        def create(self, info):
            pass

        def save(self, state_dict, path: str):
            self.files.append((path, snapshot(state_dict, self.stager, self.memo)))

        def release(self):
            self.memo.clear()  # the originals it kept alive

        def makedirs(self, path, exist_ok=False):
            os.makedirs(path, exist_ok=exist_ok)

        def load(self, path: str, map_location=None):
            raise RuntimeError("the capturing checkpoint engine only saves")

        def commit(self, info):
            return True

        def preserves_storage_sharing(self):
            return False  # every tensor becomes its own compact host copy: DeepSpeed need not clone first

    return CapturingCheckpointEngine


def capture_engine_state(engine, ckpt_dir: str, step: int,
                         stager: _HostStager | _LayoutRecorder) -> tuple[list, list[str]]:
    """Run DeepSpeed's save_checkpoint (collective) with the capturing engine: returns the files it would have
    written as (path, host state) and the recovery scripts (zero_to_fp32.py …) it would have copied."""
    original = engine.checkpoint_engine
    capture = _capturing_engine_class()(stager)
    scripts: list[str] = []
    engine.checkpoint_engine = capture
    engine._copy_recovery_script = scripts.append  # instance attribute: copied in the background instead
    try:
        engine.save_checkpoint(ckpt_dir, tag=ENGINE_TAG, client_state={"step": step}, save_latest=False)
    finally:
        engine.checkpoint_engine = original
        del engine._copy_recovery_script
    stager.synchronize()
    capture.release()
    return capture.files, scripts


def _recovery_scripts() -> list[str]:
    import deepspeed.utils

    folder = os.path.dirname(deepspeed.utils.__file__)
    return [p for p in (os.path.join(folder, n) for n in ("zero_to_fp32.py", "zero_to_torch.py")) if os.path.exists(p)]


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


# --- the writer ----------------------------------------------------------------------------------------------

class CheckpointWriter:
    """Saves checkpoints of one run into `root` (a local folder or s3:// prefix), staged in `staging` (a local
    folder; the root itself when it is local). Collective: every rank constructs it and calls save() in step."""

    def __init__(self, root: str, staging: str | None, rank: int, world_size: int, local_rank: int,
                 keep_last: int, background: bool = True, timeout_s: float = 3600.0, upload_retries: int = 5):
        self.root = root.rstrip("/") if storage.is_s3(root) else root
        self.remote = storage.is_s3(root)
        if self.remote and not staging:
            raise ValueError("a remote checkpoint root needs a local staging folder")
        self.staging = staging if self.remote else root
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.keep_last, self.background = keep_last, background
        self.upload_retries = upload_retries
        # A communicator of its own for the outcome exchange, which runs in the background thread.
        self.group = (dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
                      if world_size > 1 and background else None)
        self._stager = _HostStager()
        self._allocating: threading.Thread | None = None
        self._thread: threading.Thread | None = None
        self._outcome: SavedCheckpoint | CheckpointWriteError | None = None
        self.failed: CheckpointWriteError | None = None
        self.blocked_s: list[float] = []  # seconds each save() held the caller, for benchmarks and logs
        self.durable_s: list[float] = []  # seconds from each save()'s start until its outcome was known

    # --- public --------------------------------------------------------------------------------------------

    def prepare(self, engine, ema) -> None:
        """Collective. Rehearses a save without copying anything (DeepSpeed's traversal with a _LayoutRecorder,
        the EMA gather) and creates the host buffers it needs in a background thread, so that the first save of
        the process only copies, like every later one (DiG-XL/2 on an H200: pinning its 10.8 GB took 5-9 s of
        the first save). Call it after the first optimizer step: the optimizer's state exists from then on."""
        if self._stager.buffers or self._allocating is not None:
            return
        plan = _LayoutRecorder()
        rehearsal = tempfile.mkdtemp(prefix="dig-checkpoint-rehearsal-")
        try:
            capture_engine_state(engine, rehearsal, 0, plan)
        finally:
            shutil.rmtree(rehearsal, ignore_errors=True)
        for _name, full in ema.gather_each():
            if self.rank == 0:
                plan.copy(full)
        device = torch.cuda.current_device() if any(pinned for *_, pinned in plan.layout) else None
        self._allocating = threading.Thread(target=self._stager.allocate, args=(plan.layout, device),
                                            name="dig-checkpoint-buffers", daemon=True)
        self._allocating.start()

    def save(self, step: int, engine, ema, rank_state: dict, trainer_meta: dict) -> None:
        """Collective. Returns once the state is copied; the write goes on in the background (or inline)."""
        self.wait()  # at most one save in flight (raises the previous one's failure)
        if self._allocating is not None:
            self._allocating.join()  # prepare()'s buffers: a save this early waits for the rest of them
        t0 = time.perf_counter()
        name = checkpoint.step_name(step)
        local = os.path.join(self.staging, name)
        error = None
        try:
            os.makedirs(os.path.join(local, ENGINE_TAG), exist_ok=True)
        except OSError as exc:
            error = f"rank {self.rank}: cannot create {local}: {_describe(exc)}"
        self._raise_if_any(self._exchange(error), f"checkpoint {name} was not started")

        self._stager.reset()
        files, scripts = capture_engine_state(engine, local, step, self._stager)
        ema_full = {} if self.rank == 0 else None
        for ema_name, full in ema.gather_each():  # collective: every rank gathers, rank 0 keeps a host copy
            if ema_full is not None:
                ema_full[ema_name] = self._stager.copy(full)
        self._stager.synchronize()
        buf = io.BytesIO()
        torch.save({**rank_state, "rng": checkpoint.rng_state(), "step": step}, buf)
        meta_text = json.dumps({**trainer_meta, "step": step}, indent=1) if self.rank == 0 else None
        job = dict(step=step, name=name, local=local, files=files, scripts=scripts, ema=ema_full,
                   rank_bytes=buf.getvalue(), meta_text=meta_text, started=t0)
        if self.background:
            self._thread = threading.Thread(target=self._run, args=(job,), name=f"dig-checkpoint-{step}",
                                            daemon=True)
            self._thread.start()
        else:
            self._run(job)
        self.blocked_s.append(time.perf_counter() - t0)

    def in_flight(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def poll(self) -> SavedCheckpoint | None:
        """The outcome of the save in flight once it is done (each outcome is returned once), else None.
        Raises CheckpointWriteError when it failed (and keeps raising it from save/wait)."""
        if self.in_flight():
            return None
        return self._take()

    def wait(self) -> SavedCheckpoint | None:
        """Block until the save in flight is complete; its outcome (None if there was none to report)."""
        if self._thread is not None:
            self._thread.join()
        return self._take()

    # --- background ----------------------------------------------------------------------------------------

    def _take(self) -> SavedCheckpoint | None:
        self._thread = None
        outcome, self._outcome = self._outcome, None
        if isinstance(outcome, CheckpointWriteError):
            self.failed = outcome
        if self.failed is not None:
            raise self.failed
        return outcome

    def _run(self, job: dict) -> None:
        name, started = job["name"], job["started"]
        error = None
        try:
            written = self._write_local(job)
            if self.remote:
                self._upload(job["local"], name, written)
        except BaseException as exc:  # noqa: BLE001 - reported to every rank below
            error = f"rank {self.rank} on {socket.gethostname()}: {_describe(exc)}"
            log.error("checkpoint %s: %s", name, error)
        job.clear()  # drop the host references (the stager keeps its buffers for the next save)
        try:
            errors = self._exchange(error)
            if not any(errors):
                commit_error = None
                if self.rank == 0:
                    try:
                        self._commit(name)
                    except Exception as exc:  # noqa: BLE001
                        commit_error = f"rank 0: moving {LATEST} to {name} failed: {_describe(exc)}"
                errors = [self._broadcast_from_0(commit_error)]
            self._raise_if_any(errors, f"checkpoint {name} failed; `latest` still names the previous one")
            self._prune(name)
            self._outcome = SavedCheckpoint(int(name[len(checkpoint.STEP_PREFIX):]), name,
                                            storage.join(self.root, name))
        except CheckpointWriteError as exc:
            self._outcome = exc
        except BaseException as exc:  # noqa: BLE001 - a peer died or the exchange timed out
            self._outcome = CheckpointWriteError(f"checkpoint {name}: the ranks could not agree that it is "
                                                 f"complete ({_describe(exc)}); `latest` still names the previous one")
        self.durable_s.append(time.perf_counter() - started)

    def _write_local(self, job: dict) -> list[str]:
        local = job["local"]
        written = []
        for path, state in job["files"]:
            checkpoint.write_durable(path, lambda f, state=state: torch.save(state, f))
            written.append(path)
        for src in _recovery_scripts() if job["scripts"] else []:
            dst = os.path.join(local, os.path.basename(src))
            checkpoint.write_durable(dst, lambda f, src=src: _copy_into(src, f))
            os.chmod(dst, os.stat(dst).st_mode | 0o111)
            written.append(dst)
        if job["ema"] is not None:
            path = os.path.join(local, EMA_FILE)
            checkpoint.write_safetensors(path, job["ema"])
            written.append(path)
        if job["meta_text"] is not None:
            path = os.path.join(local, TRAINER_FILE)
            checkpoint.write_durable(path, lambda f: f.write(job["meta_text"].encode()))
            written.append(path)
        path = checkpoint.rank_file(local, self.rank)
        checkpoint.write_durable(path, lambda f: f.write(job["rank_bytes"]))
        written.append(path)
        checkpoint.fsync_path(local)                # the entries of engine/ and of the step folder …
        checkpoint.fsync_path(os.path.dirname(local))  # … and the step folder's own entry
        return written

    def _upload(self, local: str, name: str, paths: list[str]) -> None:
        for path in paths:
            rel = os.path.relpath(path, local).replace(os.sep, "/")
            uri = storage.join(self.root, name, rel)
            _retry(lambda: storage.upload_file(path, uri), f"upload {uri}", self.upload_retries)

    def _commit(self, name: str) -> None:
        if self.remote:
            uri = storage.join(self.root, LATEST)
            _retry(lambda: storage.write_bytes(uri, name.encode()), f"write {uri}", self.upload_retries)
        else:
            checkpoint._atomic_write_text(os.path.join(self.root, LATEST), name)

    def _prune(self, name: str) -> None:
        """Old complete checkpoints beyond keep_last go; never a folder newer than `name` (a save of another rank
        may already be staging it)."""
        try:
            if self.rank == 0:
                if self.remote:
                    prune_remote(self.root, self.keep_last, name)
                else:
                    checkpoint.prune_root(self.root, self.keep_last, drop_unfinished=False)
            if self.remote and self.local_rank == 0:  # staged copies older than `latest` are not needed any more
                for old in checkpoint.checkpoint_names(self.staging):
                    if old < name:
                        shutil.rmtree(os.path.join(self.staging, old), ignore_errors=True)
        except Exception as exc:  # noqa: BLE001 - the checkpoint itself is complete
            log.warning("checkpoint %s: pruning old checkpoints failed: %s", name, _describe(exc))

    # --- agreement -----------------------------------------------------------------------------------------

    def _exchange(self, error: str | None) -> list[str | None]:
        if self.world_size == 1:
            return [error]
        out: list = [None] * self.world_size
        dist.all_gather_object(out, error, group=self.group)
        return out

    def _broadcast_from_0(self, value: str | None) -> str | None:
        if self.world_size == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    @staticmethod
    def _raise_if_any(errors: list[str | None], what: str) -> None:
        failed = [e for e in errors if e]
        if failed:
            raise CheckpointWriteError(f"{what}: " + "; ".join(failed))


def _copy_into(src: str, f) -> None:
    with open(src, "rb") as s:
        shutil.copyfileobj(s, f, 1 << 20)


def _retry(action, what: str, retries: int, first_delay: float = 0.5):
    """Run `action`, retrying storage errors `retries` times with exponential backoff, each retry logged."""
    delay = first_delay
    for attempt in range(retries + 1):
        try:
            return action()
        except (storage.StorageError, OSError) as exc:
            if attempt == retries:
                raise
            log.warning("%s failed (%s); retry %d/%d in %.1fs", what, exc, attempt + 1, retries, delay)
            time.sleep(delay)
            delay = min(delay * 2, 30.0)


# --- remote roots --------------------------------------------------------------------------------------------

def _remote_step_names(root: str) -> list[str]:
    names = {n.split("/", 1)[0] for n in storage.list_names(root)}
    return sorted(n for n in names if n.startswith(checkpoint.STEP_PREFIX))


def remote_latest_name(root: str) -> str | None:
    uri = storage.join(root, LATEST)
    if not storage.exists(uri):
        return None
    return storage.read_bytes(uri).decode().strip()


def prune_remote(root: str, keep_last: int, current: str) -> None:
    complete = [n for n in _remote_step_names(root) if n <= current]
    for name in complete[::-1][max(keep_last, 1):]:
        storage.delete_tree(storage.join(root, name))


def clean_unfinished(root: str, staging: str | None) -> list[str]:
    """Remove what saves that died before `latest` moved left behind: step folders past `latest` (or all of them
    when there is none), temporary files, unfinished multipart uploads. Only while no save runs (at start, under
    the run lock). Returns the names removed."""
    if storage.is_s3(root):
        current = remote_latest_name(root)
        removed = [n for n in _remote_step_names(root) if current is None or n > current]
        for name in removed:
            storage.delete_tree(storage.join(root, name))
        storage.remove_partial_writes(root)
        if staging and os.path.isdir(staging):
            for name in checkpoint.checkpoint_names(staging):
                if current is None or name > current:
                    shutil.rmtree(os.path.join(staging, name), ignore_errors=True)
            for name in os.listdir(staging):  # downloads cut short
                if name.startswith(".download-"):
                    shutil.rmtree(os.path.join(staging, name), ignore_errors=True)
        return removed
    if not os.path.isdir(root):
        return []
    current = checkpoint.latest_in(root)
    current_name = os.path.basename(current) if current else None
    removed = [n for n in checkpoint.checkpoint_names(root) if current_name is None or n > current_name]
    checkpoint.prune_root(root, keep_last=1 << 30, drop_unfinished=True)
    return removed


def fetch_latest(root: str, staging: str | None, local_rank: int, retries: int = 5) -> str | None:
    """The local folder of the newest complete checkpoint under `root`, or None. A remote one is downloaded into
    `staging` by local rank 0 of each node (callers barrier after this); other ranks get the path it will have."""
    if not storage.is_s3(root):
        return checkpoint.latest_in(root)
    name = remote_latest_name(root)
    if name is None:
        return None
    local = os.path.join(staging, name)
    if local_rank != 0 or os.path.exists(os.path.join(local, DOWNLOADED_MARKER)):
        return local
    prefix = storage.join(root, name)
    tmp = os.path.join(staging, f".download-{socket.gethostname()}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    names = storage.list_names(prefix)
    if TRAINER_FILE not in names:
        raise CheckpointWriteError(f"{root}/{LATEST} names {name}, but {prefix} holds no {TRAINER_FILE}")
    for rel in names:
        dst = os.path.join(tmp, *rel.split("/"))
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        _retry(lambda: storage.download_file(storage.join(prefix, rel), dst), f"download {prefix}/{rel}", retries)
    with open(os.path.join(tmp, DOWNLOADED_MARKER), "w"):
        pass
    if os.path.exists(local):  # a staged copy of the same step (or another node's download): replace it
        shutil.rmtree(local, ignore_errors=True)
    try:
        os.rename(tmp, local)
    except OSError:
        if not os.path.exists(os.path.join(local, DOWNLOADED_MARKER)):
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # another node sharing this folder was first
    log.info("downloaded checkpoint %s to %s (%d files)", prefix, local, len(names))
    return local
