"""Training-side reader of latent shards (format: dig.data.shard_format), local or s3://, resumable exactly.

Order of one epoch, all derived from (seed, epoch) so every rank computes the same plan without talking:
  1. the dataset's shards are permuted; rank r takes every world-th shard from position r (ranks never read
     the same sample within an epoch);
  2. a rank's shards are cut into *windows* of `window_shards` shards; a window is loaded whole (shards fetched
     concurrently, S3 through boto3 with retries) and its samples permuted by (seed, epoch, rank, window);
  3. every rank yields exactly `quota(epoch)` samples per epoch, the smallest per-rank total of the epoch
     rounded down to whole micro-batches, so all ranks step together (the surplus of larger ranks is left out
     this epoch; other epochs deal shards differently).
Per sample a horizontal-flip choice and a posterior draw `mean + std * eps` come from a generator seeded by
(seed, epoch, sample key): no RNG state to save, and a sample gets the same draw however it is reached.

Where the work happens: a window is loaded by a worker *process* (`prefetch`; the next window while the current
one is consumed): it fetches and decodes the shards, permutes the samples, makes every sample's draw and hands
back one array of training latents. Tar parsing and per-sample draws are Python work that, in a thread, would
take the GIL from the training loop for hundreds of ms per window. The loading process is a fresh interpreter
(multiprocessing's forkserver): a script that reads batches needs the `if __name__ == "__main__":` guard.
Micro-batches are then cut from the window ahead by a background thread (`prefetch_batches`), in pinned memory
when asked (`pin_memory`: the copy to the GPU is then asynchronous).

The position is (epoch, window, offset into the window's permutation) *as of the batches handed out*:
`state_dict()` after k batches and `load_state_dict()` in a new process continue with batch k+1 exactly, however
far the workers had read ahead. Unreadable shards are retried, then skipped and counted (or raise,
`on_bad_shard="fail"`); a rank short of samples after a skip repeats samples of its current window (counted)
rather than desynchronise the ranks.

Another world size: `redealt_state(states of the N old ranks)` gives a reader of the M-rank world the position to
continue from: the samples of the current epoch that no old rank handed out are dealt to the M ranks in equal
shares of whole micro-batches (each sample keeps its window's permutation and its draw, so nothing is lost or
repeated across the change); from the next epoch on the plan is that of M ranks. The deal is part of the state
(`dealt`), so a later resume, on the same or yet another world size, continues it.
"""
from __future__ import annotations

import io
import logging
import multiprocessing
import os
import queue
import signal
import tarfile
import threading
import time
import zlib
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from dig.errors import DatasetError, DatasetNotFound  # noqa: F401  (raised and re-exported here)
from dig.inference.normalizer import LatentNormalizer

from . import storage
from .shard_format import MANIFEST_NAME, NUM_FLIPS, Manifest, decode_sample

if TYPE_CHECKING:  # torch is imported where batches are made: the window-loading process never needs it
    import torch

log = logging.getLogger(__name__)


class ShardReadError(DatasetError, RuntimeError):
    """A shard that could not be read after all retries (and on_bad_shard='fail')."""


@dataclass
class Batch:
    latents: torch.Tensor   # [B, C, h, w] float32, normalised for training
    labels: torch.Tensor    # [B] int64
    keys: list[str]         # webdataset sample keys, in batch order


def resolve_dataset(spec: str) -> tuple[str, list[str]]:
    """`folder` or `folder/name-{000000..000009}.tar` → (folder, shard names selected, [] meaning all)."""
    base = spec.rstrip("/")
    if "{" in base or base.endswith(".tar"):
        import braceexpand

        names = list(braceexpand.braceexpand(base))
        folders = {n.rsplit("/", 1)[0] for n in names}
        if len(folders) != 1:
            raise DatasetError(f"shard pattern {spec!r} must name shards of one folder")
        return folders.pop(), [n.rsplit("/", 1)[1] for n in names]
    return base, []


def load_manifest(spec: str) -> tuple[str, Manifest]:
    """Dataset root and its manifest, restricted to the shards a brace pattern names."""
    root, selected = resolve_dataset(spec)
    uri = storage.join(root, MANIFEST_NAME)
    # Absent and unreadable are different answers: only a manifest that is not there means an unfinished (or
    # wrong) dataset; a read that fails (after storage's retries) says so with its cause.
    if not storage.exists(uri):
        raise DatasetNotFound(f"no {MANIFEST_NAME} at {root}; is {spec!r} a finished dataset written by "
                              "data_pipeline?")
    try:
        text = storage.read_bytes(uri)
    except OSError as exc:
        raise storage.StorageError(f"{uri}: could not be read ({exc})") from exc
    try:
        manifest = Manifest.from_json(text)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        what = "is empty" if not text.strip() else f"is not a valid manifest ({type(exc).__name__}: {exc})"
        raise DatasetError(f"{uri} {what}; rewrite it by running data_pipeline on this output again") from None
    if selected:
        by_name = {s.name: s for s in manifest.shards}
        missing = [n for n in selected if n not in by_name]
        if missing:
            raise DatasetError(f"{spec}: shards {missing[:5]} are not in {uri}")
        manifest.shards = [by_name[n] for n in selected]
    if not manifest.shards:
        raise DatasetError(f"{spec}: the dataset has no shards")
    return root, manifest


def _seed(*parts: int) -> np.random.SeedSequence:
    return np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts])


def _key_number(key: str) -> int:
    return int(key) if key.isdigit() else zlib.crc32(key.encode())


@dataclass(frozen=True)
class _WindowJob:
    """Everything needed to load one shuffle window, picklable for the loading process."""
    root: str
    shards: tuple[tuple[int, str, int], ...]   # (index in the manifest, file name, sample count)
    seed: int
    epoch: int
    rank: int
    window: int
    sample_shape: tuple[int, int, int]
    scale: np.ndarray                          # LatentNormalizer.scale / .shift
    shift: np.ndarray
    random_flip: bool
    read_retries: int
    on_bad_shard: str
    known_bad: frozenset[int] = frozenset()    # shards this reader already skipped: not read again


@dataclass(frozen=True)
class _Part:
    """A window of an epoch's plan as one rank reads it: window `window` of rank `rank`'s plan (shard indices
    `shards`), rows [start, end) of its permutation (end None: all)."""
    rank: int
    window: int
    shards: tuple[int, ...]
    start: int
    end: int | None


@dataclass
class _Window:
    """A loaded window: the training latent (drawn, normalised) of each of its samples, in shuffled order."""
    latents: np.ndarray                        # [N, C, h, w] float32
    labels: np.ndarray                         # [N] int64
    keys: list[str]
    bad_shards: list[int] = field(default_factory=list)   # skipped in this load (counted by the reader)
    warnings: list[str] = field(default_factory=list)     # logged by the reader's own process

    def __len__(self) -> int:
        return len(self.keys)


def _tar_samples(data: bytes) -> list[dict]:
    """Raw webdataset samples of a tar: consecutive members `<key>.<field>` grouped by key, as webdataset groups
    them. (The standard library's tarfile rather than webdataset's iterators: importing webdataset imports torch,
    which the loading process otherwise never needs.)"""
    samples: list[dict] = []
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            folder, _, base = member.name.rpartition("/")
            stem, dot, suffix = base.partition(".")
            if not dot:
                raise ValueError(f"tar member {member.name!r} is not <key>.<field>")
            key = f"{folder}/{stem}" if folder else stem
            if not samples or samples[-1]["__key__"] != key:
                samples.append({"__key__": key})
            if suffix in samples[-1]:
                raise ValueError(f"tar member {member.name!r} appears twice in sample {key!r}")
            samples[-1][suffix] = tar.extractfile(member).read()
    return samples


def _read_shard(job: _WindowJob, index: int, name: str, count: int) -> tuple[list | None, str | None]:
    """(decoded samples, None), or (None, why) for a shard skipped after its retries."""
    uri = storage.join(job.root, name)
    last: Exception | None = None
    for attempt in range(job.read_retries + 1):
        try:
            samples = [decode_sample(s) for s in _tar_samples(storage.read_bytes(uri))]
            for s in samples:
                if s.mean.shape != (NUM_FLIPS, *job.sample_shape) or s.std.shape != s.mean.shape:
                    raise ValueError(f"sample {s.key}: latent shape {s.mean.shape}/{s.std.shape}, expected "
                                     f"{(NUM_FLIPS, *job.sample_shape)} from the manifest")
            if len(samples) != count:
                raise ValueError(f"{len(samples)} samples, the manifest says {count}")
            return samples, None
        except Exception as exc:  # noqa: BLE001 - retried, then skipped or raised with the cause
            last = exc
            if attempt < job.read_retries:
                time.sleep(min(0.5 * 2 ** attempt, 8.0))
    if job.on_bad_shard == "fail":
        raise ShardReadError(f"shard {uri} unreadable after {job.read_retries + 1} attempts: {last}") from last
    return None, f"skipping unreadable shard {uri} after {job.read_retries + 1} attempts ({last})"


def _draw(job: _WindowJob, sample) -> np.ndarray:
    """The training latent of `sample` in `job.epoch` before normalisation: flip choice and posterior draw
    seeded by (seed, epoch, key), so a sample gets the same draw however it is reached."""
    rng = np.random.default_rng(_seed(job.seed, job.epoch, _key_number(sample.key), 0xF11B))
    flip = int(rng.integers(NUM_FLIPS)) if job.random_flip else 0
    eps = rng.standard_normal(job.sample_shape, dtype=np.float32)
    return sample.mean[flip].astype(np.float32) + sample.std[flip].astype(np.float32) * eps


def _load_window(job: _WindowJob) -> _Window:
    """Fetch the window's shards concurrently, permute its samples, draw every training latent."""
    todo = [s for s in job.shards if s[0] not in job.known_bad]
    with ThreadPoolExecutor(max_workers=max(1, min(8, len(todo))), thread_name_prefix="shard-read") as pool:
        parts = list(pool.map(lambda s: _read_shard(job, *s), todo))
    window = _Window(np.empty((0, *job.sample_shape), np.float32), np.empty(0, np.int64), [])
    samples = []
    for (index, _, _), (part, why) in zip(todo, parts):
        if part is None:
            window.bad_shards.append(index)
            window.warnings.append(why)
        else:
            samples.extend(part)
    perm = np.random.default_rng(_seed(job.seed, job.epoch, job.rank, job.window, 0x77)).permutation(len(samples))
    samples = [samples[i] for i in perm]
    if samples:
        window.latents = np.stack([_draw(job, s) for s in samples]) * job.scale + job.shift
        window.labels = np.array([s.label for s in samples], dtype=np.int64)
        window.keys = [s.key for s in samples]
    return window


def _init_loader(environ: dict[str, str]) -> None:
    """Initializer of the loading process: the reader's environment (storage settings and credentials; the fork
    server it comes from may have started earlier), and leave when the reader's process is gone, even if it was
    killed."""
    os.environ.clear()
    os.environ.update(environ)
    # Ctrl-C reaches the whole process group and schedulers signal every process: the reader's process decides
    # when this one ends (it is shut down with the reader, or leaves when that process is gone).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    parent = multiprocessing.parent_process()

    def watch():
        from multiprocessing.connection import wait

        wait([parent.sentinel])
        os._exit(0)

    if parent is not None:
        threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _loader_context():
    # A fresh interpreter (forked from a clean server process), not a fork of the training process: that one
    # holds CUDA, NCCL and many threads.
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])  # imported once by the server (if this starts it), not per loader
    return ctx


class LatentShardReader:
    """Batches of training latents for one rank; see the module doc for the order and the resume contract."""

    def __init__(self, path: str, *, rank: int, world_size: int, micro_batch_size: int, seed: int = 0,
                 window_shards: int = 8, latent_norm: str = "scaling_factor", random_flip: bool = True,
                 read_retries: int = 3, on_bad_shard: str = "skip", prefetch: bool = True,
                 prefetch_batches: int = 4, pin_memory: bool = False, expected_latent_size: int | None = None):
        self.root, self.manifest = load_manifest(path)
        if expected_latent_size is not None and self.manifest.latent_size != expected_latent_size:
            raise DatasetError(f"{path}: latents are {self.manifest.latent_size}x{self.manifest.latent_size}, "
                             f"the run expects {expected_latent_size}x{expected_latent_size}")
        if len(self.manifest.shards) < world_size:
            raise DatasetError(f"{path}: {len(self.manifest.shards)} shards cannot feed {world_size} ranks "
                             "(each rank needs at least one shard per epoch); write smaller shards")
        if on_bad_shard not in ("skip", "fail"):
            raise ValueError(f"on_bad_shard must be 'skip' or 'fail', got {on_bad_shard!r}")
        self.rank, self.world_size, self.micro_batch_size = rank, world_size, micro_batch_size
        self.seed, self.window_shards, self.random_flip = seed, window_shards, random_flip
        self.read_retries, self.on_bad_shard, self.prefetch = read_retries, on_bad_shard, prefetch
        self.normalizer = LatentNormalizer.from_dataset(self.root, self.manifest, latent_norm)
        shape = (self.manifest.latent_channels, self.manifest.latent_size, self.manifest.latent_size)
        self.sample_shape = shape
        # position
        self._epoch, self._window, self._offset, self._consumed = 0, 0, 0, 0
        # counters (reported to tracking)
        self.shards_skipped = 0
        self.samples_repeated = 0
        self._window_data: _Window | None = None   # the current window
        self._window_id: tuple[int, int] | None = None
        self._loader: ProcessPoolExecutor | None = None   # started at the first window load (prefetch)
        self._prefetched: dict[tuple[int, int], object] = {}
        self._bad_shards: set[int] = set()   # skipped once, not retried again by this reader
        self._repeat: tuple[int, _Window] | None = None
        self.pin_memory = pin_memory
        self._plans: dict[int, tuple[int, list[_Part]]] = {}
        # The rest of an epoch re-dealt to this world size on resume (see `redealt_state`), or None
        self._dealt: dict | None = None
        # batches cut from the loaded windows ahead by a background thread (stacking, pinning)
        self.prefetch_batches = prefetch_batches
        self._queue: queue.Queue = queue.Queue(maxsize=max(prefetch_batches, 1))
        self._producer: threading.Thread | None = None
        self._stop = threading.Event()
        self._handed: dict | None = None
        if self.quota(0) < micro_batch_size:
            raise DatasetError(f"{path}: rank {rank} gets fewer than micro_batch_size={micro_batch_size} samples "
                             f"per epoch across {world_size} ranks; the dataset is too small")

    # --- the epoch plan ---------------------------------------------------------------------------------------

    def rank_shards(self, epoch: int, rank: int | None = None, world_size: int | None = None) -> list[int]:
        order = np.random.default_rng(_seed(self.seed, epoch, 0x5A4D)).permutation(len(self.manifest.shards))
        return [int(i) for i in order[(self.rank if rank is None else rank)::world_size or self.world_size]]

    def _source_windows(self, epoch: int, rank: int, world_size: int, window_shards: int) -> list[list[int]]:
        """Shard indices of each window of `rank` in the plan of `epoch` for `world_size` ranks."""
        shards = self.rank_shards(epoch, rank, world_size)
        return [shards[i:i + window_shards] for i in range(0, len(shards), window_shards)]

    def _quota_for(self, epoch: int, world_size: int, micro_batch_size: int) -> int:
        counts = [s.count for s in self.manifest.shards]
        totals = [sum(counts[i] for i in self.rank_shards(epoch, r, world_size)) for r in range(world_size)]
        return min(totals) // micro_batch_size * micro_batch_size

    def _plan(self, epoch: int) -> tuple[int, list[_Part]]:
        """(quota, this rank's parts) of `epoch`, computed once per epoch. A part is a window of the epoch's plan
        (normally this rank's own windows, all rows; after a re-deal, row ranges of the windows of the ranks
        that started the epoch)."""
        if epoch not in self._plans:
            dealt = self._dealt if self._dealt is not None and self._dealt["epoch"] == epoch else None
            if dealt is None:
                quota = self._quota_for(epoch, self.world_size, self.micro_batch_size)
                windows = self._source_windows(epoch, self.rank, self.world_size, self.window_shards)
                parts = [_Part(self.rank, w, tuple(shards), 0, None) for w, shards in enumerate(windows)]
            else:
                quota, parts, cache = dealt["quota"], [], {}
                for src_rank, src_window, start, end in dealt["segments"]:
                    if src_rank not in cache:
                        cache[src_rank] = self._source_windows(epoch, src_rank, dealt["world_size"],
                                                               dealt["window_shards"])
                    parts.append(_Part(src_rank, src_window, tuple(cache[src_rank][src_window]), start, end))
            self._plans = {e: p for e, p in self._plans.items() if e >= epoch - 1}
            self._plans[epoch] = (quota, parts)
        return self._plans[epoch]

    def quota(self, epoch: int) -> int:
        """Samples every rank yields in `epoch`: the smallest rank total, rounded down to micro-batches (after a
        re-deal: this rank's share of the epoch's rest)."""
        return self._plan(epoch)[0]

    def steps_per_epoch(self, epoch: int = 0) -> int:
        return self.quota(epoch) // self.micro_batch_size

    def _windows(self, epoch: int) -> list[_Part]:
        return self._plan(epoch)[1]

    # --- loading ----------------------------------------------------------------------------------------------

    def _job(self, epoch: int, window: int) -> _WindowJob:
        part = self._windows(epoch)[window]
        shards = tuple((i, self.manifest.shards[i].name, self.manifest.shards[i].count) for i in part.shards)
        # the window's permutation is that of the rank whose plan it belongs to, so a re-dealt window has the
        # same sample order as it had before the re-deal
        return _WindowJob(self.root, shards, self.seed, epoch, part.rank, part.window, self.sample_shape,
                          self.normalizer.scale, self.normalizer.shift, self.random_flip, self.read_retries,
                          self.on_bad_shard, frozenset(self._bad_shards))

    def _submit(self, epoch: int, window: int):
        if self._loader is None:
            self._loader = ProcessPoolExecutor(max_workers=1, mp_context=_loader_context(),
                                               initializer=_init_loader, initargs=(dict(os.environ),))
        return self._loader.submit(_load_window, self._job(epoch, window))

    def _take(self, window: _Window) -> _Window:
        """Count and report the shards a load skipped (here: the loading process has no logging set up)."""
        for index, why in zip(window.bad_shards, window.warnings):
            if index not in self._bad_shards:
                self._bad_shards.add(index)
                self.shards_skipped += 1
                log.warning("%s; skipped so far: %d", why, self.shards_skipped)
        return window

    def _current_window(self, window: int | None = None) -> _Window:
        key = (self._epoch, self._window if window is None else window)
        if self._window_id != key:
            fut = self._prefetched.pop(key, None)
            if fut is None and self.prefetch:
                fut = self._submit(*key)
            self._window_data = self._take(fut.result() if fut is not None else _load_window(self._job(*key)))
            self._window_id = key
            if self.prefetch:
                nxt = (self._epoch, key[1] + 1)
                if key[1] + 1 >= len(self._windows(self._epoch)):
                    nxt = (self._epoch + 1, 0)
                if nxt not in self._prefetched:
                    self._prefetched = {nxt: self._submit(*nxt)}
        return self._window_data

    # --- iteration --------------------------------------------------------------------------------------------

    def _next_sample(self) -> tuple[_Window, int]:
        """(window, row) of the next sample."""
        if self._consumed >= self.quota(self._epoch):
            self._epoch, self._window, self._offset, self._consumed = self._epoch + 1, 0, 0, 0
            if self._dealt is not None and self._dealt["epoch"] < self._epoch:
                self._dealt = None
        parts = self._windows(self._epoch)
        n_windows = len(parts)
        while self._window < n_windows:
            window = self._current_window()
            part = parts[self._window]
            end = len(window) if part.end is None else min(part.end, len(window))
            if part.start + self._offset < end:
                row = part.start + self._offset
                self._offset += 1
                self._consumed += 1
                return window, row
            self._window, self._offset = self._window + 1, 0
        # Short of the quota (skipped shards): repeat samples of the last readable window so ranks stay in step.
        if self._repeat is None or self._repeat[0] != self._epoch:
            window = None
            for w in reversed(range(n_windows)):
                window = self._current_window(w)
                if len(window):
                    break
            self._repeat = (self._epoch, window)
        window = self._repeat[1]
        if window is None or not len(window):
            raise ShardReadError(f"rank {self.rank}: no readable shard in epoch {self._epoch}")
        row = self._consumed % len(window)
        self._consumed += 1
        self.samples_repeated += 1
        return window, row

    def _build_batch(self) -> Batch:
        import torch

        rows = [self._next_sample() for _ in range(self.micro_batch_size)]
        latents = torch.from_numpy(np.stack([w.latents[i] for w, i in rows]))
        labels = torch.from_numpy(np.array([w.labels[i] for w, i in rows], dtype=np.int64))
        if self.pin_memory:
            latents, labels = latents.pin_memory(), labels.pin_memory()
        return Batch(latents, labels, [w.keys[i] for w, i in rows])

    def _position(self) -> dict:
        return {"epoch": self._epoch, "window": self._window, "offset": self._offset, "consumed": self._consumed,
                "shards_skipped": self.shards_skipped, "samples_repeated": self.samples_repeated,
                "dealt": self._dealt}

    def next_batch(self) -> Batch:
        """The next micro-batch. With prefetch_batches > 0 it was assembled ahead by a background thread; the
        position reported by state_dict() is always that right after the batches handed out so far."""
        if self.prefetch_batches <= 0:
            batch = self._build_batch()
            self._handed = self._position()
            return batch
        if self._producer is None:
            self._producer = threading.Thread(target=self._produce, name="batch-prefetch", daemon=True)
            self._producer.start()
        item = self._queue.get()
        if isinstance(item, BaseException):
            self._stop_producer()
            raise item
        batch, self._handed = item
        return batch

    def _produce(self) -> None:
        while not self._stop.is_set():
            try:
                item = (self._build_batch(), self._position())
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
                item = exc
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item, BaseException):
                return

    def _stop_producer(self) -> None:
        if self._producer is None:
            return
        self._stop.set()
        while self._producer.is_alive():
            try:
                self._queue.get(timeout=0.05)
            except queue.Empty:
                pass
        self._producer.join()
        self._producer = None
        self._queue = queue.Queue(maxsize=max(self.prefetch_batches, 1))
        self._stop.clear()

    @property
    def epoch(self) -> int:
        """Epoch of the last batch handed out (the prefetching thread may already be ahead)."""
        return (self._handed or self._position())["epoch"]

    def __iter__(self):
        while True:
            yield self.next_batch()

    # --- resume -----------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {**(self._handed or self._position()), "rank": self.rank, "world_size": self.world_size, "seed": self.seed,
                "micro_batch_size": self.micro_batch_size, "window_shards": self.window_shards,
                "shards": [s.name for s in self.manifest.shards]}

    def load_state_dict(self, state: dict) -> None:
        self._stop_producer()
        mine = self.state_dict()
        for k in ("rank", "world_size", "seed", "micro_batch_size", "window_shards", "shards"):
            if state[k] != mine[k]:
                what = "the dataset's shard list" if k == "shards" else f"{k} ({state[k]} -> {mine[k]})"
                raise DatasetError(f"cannot resume the data position: {what} changed since the checkpoint; "
                                 "resume with the same dataset, world size, seed and batch geometry")
        self._epoch, self._window, self._offset, self._consumed = (state["epoch"], state["window"], state["offset"],
                                                               state["consumed"])
        self.shards_skipped, self.samples_repeated = state["shards_skipped"], state["samples_repeated"]
        self._dealt = state.get("dealt")
        self._window_id, self._window_data, self._prefetched, self._repeat = None, None, {}, None
        self._plans = {}
        self._handed = None

    def redealt_state(self, states: list[dict]) -> dict:
        """The state this reader resumes from when a run checkpointed by `len(states)` ranks (their
        `state_dict()`s, in rank order) continues on this reader's world size: the samples of the current epoch
        that no old rank has handed out yet are dealt to the new ranks in equal shares of whole micro-batches
        (contiguous runs of the old ranks' remaining sequences, in old-rank order; each sample keeps its window's
        permutation and its draw). The remainder that does not fill a micro-batch on every new rank is left out of
        this epoch (logged), as the surplus of larger ranks is every epoch. Every rank computes the same deal from
        the same states, without talking. Later epochs follow the plan for the new world size."""
        old_world = len(states)
        if not states or any(s["world_size"] != old_world or s["rank"] != q for q, s in enumerate(states)):
            raise ValueError(f"cannot re-deal the data position: expected the states of ranks 0..{old_world - 1} "
                             f"of one {old_world}-rank run, got ranks {[s.get('rank') for s in states]}")
        mine = self.state_dict()
        for k in ("seed", "shards"):
            if any(s[k] != mine[k] for s in states):
                what = "the dataset's shard list" if k == "shards" else f"{k} ({states[0][k]} -> {mine[k]})"
                raise ValueError(f"cannot resume the data position: {what} changed since the checkpoint; "
                                 "resume with the same dataset and seed")
        positions = {(s["epoch"], s["consumed"]) for s in states}
        if len(positions) != 1:
            raise ValueError(f"cannot re-deal the data position: the {old_world} ranks of the checkpoint stand at "
                             f"different (epoch, samples consumed) {sorted(positions)}; they must step together")
        epoch = states[0]["epoch"]
        current = [s.get("dealt") if s.get("dealt") and s["dealt"]["epoch"] == epoch else None for s in states]
        lineage = {(d["world_size"], d["window_shards"]) if d else (old_world, s["window_shards"])
                   for s, d in zip(states, current)}
        if len(lineage) > 1:
            raise ValueError(f"cannot re-deal the data position: the ranks' epoch plans disagree {sorted(lineage)}")
        plan_world, plan_window_shards = lineage.pop()

        rest: list[list[int]] = []   # [source rank, source window, start row, end row] in old-rank order
        for s, dealt in zip(states, current):
            if dealt is None:
                quota = self._quota_for(epoch, old_world, s["micro_batch_size"])
                windows = self._source_windows(epoch, s["rank"], old_world, s["window_shards"])
                parts = [(s["rank"], w, 0, sum(self.manifest.shards[i].count for i in shards))
                         for w, shards in enumerate(windows)]
            else:
                quota, parts = dealt["quota"], [tuple(seg) for seg in dealt["segments"]]
            left = quota - s["consumed"]
            for w in range(s["window"], len(parts)):
                if left <= 0:
                    break
                src_rank, src_window, start, end = parts[w]
                start += s["offset"] if w == s["window"] else 0
                take = min(end - start, left)
                if take > 0:
                    rest.append([src_rank, src_window, start, start + take])
                    left -= take
        remaining = sum(b - a for _, _, a, b in rest)
        share = remaining // (self.world_size * self.micro_batch_size) * self.micro_batch_size
        if remaining - share * self.world_size and self.rank == 0:
            log.warning("re-deal of epoch %d to %d ranks: %d of the epoch's %d remaining samples do not fill a "
                        "micro-batch of %d on every rank and are left out of this epoch", epoch, self.world_size,
                        remaining - share * self.world_size, remaining, self.micro_batch_size)
        state = {**mine, "epoch": epoch, "window": 0, "offset": 0, "consumed": 0,
                 "shards_skipped": states[self.rank]["shards_skipped"] if self.rank < old_world else 0,
                 "samples_repeated": states[self.rank]["samples_repeated"] if self.rank < old_world else 0,
                 "dealt": None}
        if share == 0:
            state["epoch"] = epoch + 1   # nothing left to deal: the next epoch, planned for the new world size
            return state
        lo, hi, pos, segments = self.rank * share, (self.rank + 1) * share, 0, []
        for src_rank, src_window, a, b in rest:
            first, last = max(a, a + lo - pos), min(b, a + hi - pos)
            if first < last:
                segments.append([src_rank, src_window, first, last])
            pos += b - a
        state["dealt"] = {"epoch": epoch, "world_size": plan_world, "window_shards": plan_window_shards,
                          "quota": share, "segments": segments}
        return state

    def close(self) -> None:
        self._stop_producer()
        if self._loader is not None:
            self._loader.shutdown(wait=False, cancel_futures=True)
            self._loader = None

