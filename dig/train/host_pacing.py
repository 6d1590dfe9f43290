"""The training process's Python runtime settings while it trains: when garbage is collected, how often threads
take turns.

At 32 images per GPU the host launches a step's kernels barely ahead of the GPU, so a pause of the launching
thread becomes GPU idle time. Two such pauses, measured on an H200 (DiG-XL/2 at 256 px: `dig train` 401 → 413
img/s with both settings, `bash bench/gpu/host_pacing_ab.sh`; BENCHMARKS.md, fifth session of 2026-11-29):
  * automatic garbage collection, which runs in whichever thread allocates when its counters say so (e.g. the
    autograd thread replaying the blocks' backward graphs). It is turned off while training; a young-generation
    collection runs every `gc_every` steps and a full one every `FULL_EVERY` of those, at step boundaries.
  * CPython hands the GIL to a waiting thread only every 5 ms (`sys.getswitchinterval`), so a block launch that
    needs the GIL while another thread (batch prefetch, checkpoint writer, metrics) holds it can wait that long.
Both are restored when training ends.
"""
from __future__ import annotations

import gc
import sys

FULL_EVERY = 20  # young-generation collections per full collection


class HostPacing:
    def __init__(self, gc_every: int, gil_switch_interval_ms: float | None):
        if gc_every < 0:
            raise ValueError(f"gc_every must be >= 0, got {gc_every}")
        self.gc_every = gc_every
        self.switch_interval = None if gil_switch_interval_ms is None else gil_switch_interval_ms / 1e3
        self._saved: tuple[bool, float] | None = None

    def __enter__(self) -> "HostPacing":
        self._saved = (gc.isenabled(), sys.getswitchinterval())
        if self.switch_interval is not None:
            sys.setswitchinterval(self.switch_interval)
        if self.gc_every:
            gc.collect()  # start from a clean heap: the setup's garbage is not carried into the run
            gc.disable()
        return self

    def step_done(self, step: int) -> None:
        """Call after optimizer step `step` (counted from 1, as the trainer counts): the due collection, if any."""
        if self.gc_every and step % self.gc_every == 0:
            gc.collect(2 if step % (self.gc_every * FULL_EVERY) == 0 else 1)

    def __exit__(self, *exc) -> None:
        if self._saved is None:
            return
        enabled, interval = self._saved
        sys.setswitchinterval(interval)
        if enabled:
            gc.enable()
        self._saved = None
