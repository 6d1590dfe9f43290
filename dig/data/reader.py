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

Micro-batches are assembled ahead by a background thread (`prefetch_batches`), the next window is loaded
while the current one is consumed (`prefetch`). The position is (epoch, window, offset into the window's
permutation) *as of the batches handed out*: `state_dict()` after k batches and `load_state_dict()` in a new
process continue with batch k+1 exactly, however far the threads had read ahead. Unreadable shards are retried, then
skipped and counted (or raise, `on_bad_shard="fail"`); a rank short of samples after a skip repeats samples of
its current window (counted) rather than desynchronise the ranks.
"""
from __future__ import annotations

import io
import logging
import queue
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from . import storage
from .shard_format import MANIFEST_NAME, NUM_FLIPS, STATS_NAME, LatentStats, Manifest, decode_sample

log = logging.getLogger(__name__)


class ShardReadError(RuntimeError):
    """A shard that could not be read after all retries (and on_bad_shard='fail')."""


@dataclass
class Batch:
    latents: torch.Tensor   # [B, C, h, w] float32, normalised for training
    labels: torch.Tensor    # [B] int64
    keys: list[str]         # webdataset sample keys, in batch order


class LatentNormalizer:
    """Stored (unscaled) latents ↔ training latents: `x * scaling_factor`, or per-channel `(x - mean) / std`."""

    def __init__(self, scale: np.ndarray, shift: np.ndarray, kind: str):
        self.scale = np.asarray(scale, np.float32).reshape(-1, 1, 1)
        self.shift = np.asarray(shift, np.float32).reshape(-1, 1, 1)
        self.kind = kind

    @classmethod
    def from_dataset(cls, root: str, manifest: Manifest, kind: str) -> "LatentNormalizer":
        c = manifest.latent_channels
        if kind == "scaling_factor":
            return cls(np.full(c, manifest.scaling_factor), np.zeros(c), kind)
        if kind == "stats":
            uri = storage.join(root, STATS_NAME)
            if not storage.exists(uri):
                raise FileNotFoundError(f"data.latent_norm=stats but {uri} does not exist")
            stats = LatentStats.from_json(storage.read_bytes(uri))
            mean, std = np.asarray(stats.mean, np.float32), np.asarray(stats.std, np.float32)
            if mean.shape != (c,) or std.shape != (c,):
                raise ValueError(f"{uri}: mean/std must have {c} entries, got {mean.shape} and {std.shape}")
            return cls(1.0 / std, -mean / std, kind)
        raise ValueError(f"unknown latent normalisation {kind!r} (scaling_factor or stats)")

    def normalize(self, x: np.ndarray) -> np.ndarray:
        return x * self.scale + self.shift

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        scale = torch.as_tensor(self.scale, dtype=x.dtype, device=x.device)
        shift = torch.as_tensor(self.shift, dtype=x.dtype, device=x.device)
        return (x - shift) / scale

    def to_dict(self) -> dict:
        return {"kind": self.kind, "scale": self.scale.ravel().tolist(), "shift": self.shift.ravel().tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> "LatentNormalizer":
        return cls(np.asarray(d["scale"]), np.asarray(d["shift"]), d["kind"])


def resolve_dataset(spec: str) -> tuple[str, list[str]]:
    """`folder` or `folder/name-{000000..000009}.tar` → (folder, shard names selected, [] meaning all)."""
    base = spec.rstrip("/")
    if "{" in base or base.endswith(".tar"):
        import braceexpand

        names = list(braceexpand.braceexpand(base))
        folders = {n.rsplit("/", 1)[0] for n in names}
        if len(folders) != 1:
            raise ValueError(f"shard pattern {spec!r} must name shards of one folder")
        return folders.pop(), [n.rsplit("/", 1)[1] for n in names]
    return base, []


def load_manifest(spec: str) -> tuple[str, Manifest]:
    """Dataset root and its manifest, restricted to the shards a brace pattern names."""
    root, selected = resolve_dataset(spec)
    uri = storage.join(root, MANIFEST_NAME)
    try:
        text = storage.read_bytes(uri)
    except (OSError, storage.StorageError) as exc:
        raise FileNotFoundError(f"no readable {MANIFEST_NAME} at {root} ({exc}); is {spec!r} a finished dataset "
                                "written by data_pipeline?") from exc
    manifest = Manifest.from_json(text)
    if selected:
        by_name = {s.name: s for s in manifest.shards}
        missing = [n for n in selected if n not in by_name]
        if missing:
            raise ValueError(f"{spec}: shards {missing[:5]} are not in {uri}")
        manifest.shards = [by_name[n] for n in selected]
    if not manifest.shards:
        raise ValueError(f"{spec}: the dataset has no shards")
    return root, manifest


def _seed(*parts: int) -> np.random.SeedSequence:
    return np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts])


def _key_number(key: str) -> int:
    return int(key) if key.isdigit() else zlib.crc32(key.encode())


class LatentShardReader:
    """Batches of training latents for one rank; see the module doc for the order and the resume contract."""

    def __init__(self, path: str, *, rank: int, world_size: int, micro_batch_size: int, seed: int = 0,
                 window_shards: int = 8, latent_norm: str = "scaling_factor", random_flip: bool = True,
                 read_retries: int = 3, on_bad_shard: str = "skip", prefetch: bool = True,
                 prefetch_batches: int = 4, expected_latent_size: int | None = None):
        self.root, self.manifest = load_manifest(path)
        if expected_latent_size is not None and self.manifest.latent_size != expected_latent_size:
            raise ValueError(f"{path}: latents are {self.manifest.latent_size}x{self.manifest.latent_size}, "
                             f"the run expects {expected_latent_size}x{expected_latent_size}")
        if len(self.manifest.shards) < world_size:
            raise ValueError(f"{path}: {len(self.manifest.shards)} shards cannot feed {world_size} ranks "
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
        self._window_samples: list | None = None   # decoded samples of the current window, permuted
        self._window_id: tuple[int, int] | None = None
        # two pools: a window load (one at a time, the next one ahead) waits on the shard reads it fans out
        self._shard_pool = ThreadPoolExecutor(max_workers=min(8, window_shards), thread_name_prefix="shard-read")
        self._window_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="window-load")
        self._prefetched: dict[tuple[int, int], object] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._bad_shards: set[int] = set()   # skipped once, not retried again by this process
        self._repeat: tuple[int, list] | None = None
        self._plans: dict[int, tuple[int, list[list[int]]]] = {}
        # batches assembled ahead by a background thread (flip choice, posterior draw, normalisation, stacking)
        self.prefetch_batches = prefetch_batches
        self._queue: queue.Queue = queue.Queue(maxsize=max(prefetch_batches, 1))
        self._producer: threading.Thread | None = None
        self._stop = threading.Event()
        self._handed: dict | None = None
        if self.quota(0) < micro_batch_size:
            raise ValueError(f"{path}: rank {rank} gets fewer than micro_batch_size={micro_batch_size} samples "
                             f"per epoch across {world_size} ranks; the dataset is too small")

    # --- the epoch plan ---------------------------------------------------------------------------------------

    def rank_shards(self, epoch: int, rank: int | None = None) -> list[int]:
        order = np.random.default_rng(_seed(self.seed, epoch, 0x5A4D)).permutation(len(self.manifest.shards))
        return [int(i) for i in order[(self.rank if rank is None else rank)::self.world_size]]

    def _plan(self, epoch: int) -> tuple[int, list[list[int]]]:
        """(quota, this rank's windows of shard indices) of `epoch`, computed once per epoch."""
        if epoch not in self._plans:
            counts = [s.count for s in self.manifest.shards]
            totals = [sum(counts[i] for i in self.rank_shards(epoch, r)) for r in range(self.world_size)]
            quota = min(totals) // self.micro_batch_size * self.micro_batch_size
            shards = self.rank_shards(epoch)
            windows = [shards[i:i + self.window_shards] for i in range(0, len(shards), self.window_shards)]
            self._plans = {e: p for e, p in self._plans.items() if e >= epoch - 1}
            self._plans[epoch] = (quota, windows)
        return self._plans[epoch]

    def quota(self, epoch: int) -> int:
        """Samples every rank yields in `epoch`: the smallest rank total, rounded down to micro-batches."""
        return self._plan(epoch)[0]

    def steps_per_epoch(self, epoch: int = 0) -> int:
        return self.quota(epoch) // self.micro_batch_size

    def _windows(self, epoch: int) -> list[list[int]]:
        return self._plan(epoch)[1]

    # --- loading ----------------------------------------------------------------------------------------------

    def _read_shard(self, index: int) -> list:
        if index in self._bad_shards or self._closed:
            return []
        entry = self.manifest.shards[index]
        uri = storage.join(self.root, entry.name)
        from webdataset.tariterators import group_by_keys, tar_file_expander

        last: Exception | None = None
        for attempt in range(self.read_retries + 1):
            try:
                data = storage.read_bytes(uri)
                files = tar_file_expander([{"url": uri, "stream": io.BytesIO(data)}])
                samples = [decode_sample(s) for s in group_by_keys(files)]
                for s in samples:
                    if s.mean.shape != (NUM_FLIPS, *self.sample_shape) or s.std.shape != s.mean.shape:
                        raise ValueError(f"sample {s.key}: latent shape {s.mean.shape}/{s.std.shape}, expected "
                                         f"{(NUM_FLIPS, *self.sample_shape)} from the manifest")
                if len(samples) != entry.count:
                    raise ValueError(f"{len(samples)} samples, the manifest says {entry.count}")
                return samples
            except Exception as exc:  # noqa: BLE001 - retried, then skipped or raised with the cause
                if self._closed:  # a prefetch still running when the reader was closed
                    return []
                last = exc
                if attempt < self.read_retries:
                    time.sleep(min(0.5 * 2 ** attempt, 8.0))
        if self.on_bad_shard == "fail":
            raise ShardReadError(f"shard {uri} unreadable after {self.read_retries + 1} attempts: {last}") from last
        with self._lock:
            self._bad_shards.add(index)
            self.shards_skipped += 1
        log.warning("skipping unreadable shard %s after %d attempts (%s); skipped so far: %d",
                    uri, self.read_retries + 1, last, self.shards_skipped)
        return []

    def _load_window(self, epoch: int, window: int) -> list:
        windows = self._windows(epoch)
        if window >= len(windows):
            return []
        parts = list(self._shard_pool.map(self._read_shard, windows[window]))
        samples = [s for part in parts for s in part]
        perm = np.random.default_rng(_seed(self.seed, epoch, self.rank, window, 0x77)).permutation(len(samples))
        return [samples[i] for i in perm]

    def _window_future(self, epoch: int, window: int):
        key = (epoch, window)
        fut = self._prefetched.pop(key, None)
        if fut is None:
            fut = self._window_pool.submit(self._load_window, epoch, window) if self.prefetch else None
        return fut

    def _current_window(self, window: int | None = None) -> list:
        key = (self._epoch, self._window if window is None else window)
        if self._window_id != key:
            fut = self._window_future(*key)
            self._window_samples = fut.result() if fut is not None else self._load_window(*key)
            self._window_id = key
            if self.prefetch:
                nxt = (self._epoch, key[1] + 1)
                if key[1] + 1 >= len(self._windows(self._epoch)):
                    nxt = (self._epoch + 1, 0)
                if nxt not in self._prefetched:
                    self._prefetched = {nxt: self._window_pool.submit(self._load_window, *nxt)}
        return self._window_samples

    # --- iteration --------------------------------------------------------------------------------------------

    def _next_sample(self):
        if self._consumed >= self.quota(self._epoch):
            self._epoch, self._window, self._offset, self._consumed = self._epoch + 1, 0, 0, 0
        n_windows = len(self._windows(self._epoch))
        while self._window < n_windows:
            samples = self._current_window()
            if self._offset < len(samples):
                sample = samples[self._offset]
                self._offset += 1
                self._consumed += 1
                return self._epoch, sample
            self._window, self._offset = self._window + 1, 0
        # Short of the quota (skipped shards): repeat samples of the last readable window so ranks stay in step.
        if self._repeat is None or self._repeat[0] != self._epoch:
            samples = []
            for window in reversed(range(n_windows)):
                samples = self._current_window(window)
                if samples:
                    break
            self._repeat = (self._epoch, samples)
        samples = self._repeat[1]
        if not samples:
            raise ShardReadError(f"rank {self.rank}: no readable shard in epoch {self._epoch}")
        sample = samples[self._consumed % len(samples)]
        self._consumed += 1
        self.samples_repeated += 1
        return self._epoch, sample

    def draw(self, epoch: int, sample) -> np.ndarray:
        """The training latent of `sample` in `epoch`: flip choice and posterior draw seeded by its key."""
        rng = np.random.default_rng(_seed(self.seed, epoch, _key_number(sample.key), 0xF11B))
        flip = int(rng.integers(NUM_FLIPS)) if self.random_flip else 0
        eps = rng.standard_normal(self.sample_shape, dtype=np.float32)
        x = sample.mean[flip].astype(np.float32) + sample.std[flip].astype(np.float32) * eps
        return self.normalizer.normalize(x)

    def _build_batch(self) -> Batch:
        latents, labels, keys = [], [], []
        for _ in range(self.micro_batch_size):
            epoch, sample = self._next_sample()
            latents.append(self.draw(epoch, sample))
            labels.append(sample.label)
            keys.append(sample.key)
        return Batch(torch.from_numpy(np.stack(latents)), torch.tensor(labels, dtype=torch.int64), keys)

    def _position(self) -> dict:
        return {"epoch": self._epoch, "window": self._window, "offset": self._offset, "consumed": self._consumed,
                "shards_skipped": self.shards_skipped, "samples_repeated": self.samples_repeated}

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
                raise ValueError(f"cannot resume the data position: {what} changed since the checkpoint; "
                                 "resume with the same dataset, world size, seed and batch geometry")
        self._epoch, self._window, self._offset, self._consumed = (state["epoch"], state["window"], state["offset"],
                                                               state["consumed"])
        self.shards_skipped, self.samples_repeated = state["shards_skipped"], state["samples_repeated"]
        self._window_id, self._window_samples, self._prefetched, self._repeat = None, None, {}, None
        self._handed = None

    def close(self) -> None:
        self._closed = True
        self._stop_producer()
        self._window_pool.shutdown(wait=False, cancel_futures=True)
        self._shard_pool.shutdown(wait=False, cancel_futures=True)

