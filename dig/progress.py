"""Progress for long work: a tqdm bar on a terminal, one plain line per interval otherwise (logs, Ray job logs,
Slurm output), both with done/total, rate and ETA in tqdm's format.

    with Progress(total=n, desc="preprocess", unit="img") as bar:
        for ...: bar.update(k)

`DIG_PROGRESS=bar|lines|off` forces a mode (default: bar when stderr is a terminal, else lines);
`DIG_PROGRESS_INTERVAL` sets the seconds between plain lines (default 30).
"""
from __future__ import annotations

import os
import sys
import time

from tqdm import tqdm


def progress_mode(stream=None) -> str:
    forced = os.environ.get("DIG_PROGRESS", "").strip().lower()
    if forced in ("bar", "lines", "off"):
        return forced
    stream = stream or sys.stderr
    return "bar" if hasattr(stream, "isatty") and stream.isatty() else "lines"


class Progress:
    """`update(n)` / `set_postfix(**values)` / `close()`; `line()` is the current status as one line of text."""

    def __init__(self, total: int | None, desc: str, unit: str = "it", initial: int = 0,
                 interval: float | None = None, stream=None, mode: str | None = None):
        self.total, self.desc, self.unit = total, desc, unit
        self.n = self._start_n = initial
        self.stream = stream or sys.stderr
        self.mode = mode or progress_mode(self.stream)
        self.interval = float(os.environ.get("DIG_PROGRESS_INTERVAL", 30)) if interval is None else interval
        self.postfix: dict[str, str] = {}
        self._start = self._last_line = time.monotonic()
        self._emitted_n = initial
        self._closed = False
        self._bar = (tqdm(total=total, desc=desc, unit=unit, initial=initial, file=self.stream, dynamic_ncols=True,
                          smoothing=0.1) if self.mode == "bar" else None)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self._start

    @property
    def rate(self) -> float | None:
        done = self.n - self._start_n
        return done / self.elapsed if done > 0 and self.elapsed > 0 else None

    def line(self) -> str:
        postfix = ", ".join(f"{k}={v}" for k, v in self.postfix.items())
        return tqdm.format_meter(self.n, self.total, self.elapsed, prefix=self.desc, unit=self.unit,
                                 rate=self.rate, initial=self._start_n, postfix=postfix or None, ncols=0)

    def set_postfix(self, **values) -> None:
        self.postfix = {k: (f"{v:.4g}" if isinstance(v, float) else str(v)) for k, v in values.items()}
        if self._bar is not None:
            self._bar.set_postfix(self.postfix, refresh=False)

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.mode == "lines" and time.monotonic() - self._last_line >= self.interval:
            self.emit()

    def emit(self) -> None:
        """Print the status line now (lines mode), e.g. at a logging step."""
        if self.mode == "lines":
            print(self.line(), file=self.stream, flush=True)
            self._last_line = time.monotonic()
            self._emitted_n = self.n

    def write(self, message: str) -> None:
        """A message that does not break the bar."""
        if self._bar is not None:
            self._bar.write(message, file=self.stream)
        else:
            print(message, file=self.stream, flush=True)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif self.mode == "lines" and self.n != self._emitted_n:  # the final state, unless just printed
            self.emit()
