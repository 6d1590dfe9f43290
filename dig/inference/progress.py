"""Progress of long work: a tqdm bar with ETA on a terminal; in logs (not a terminal) one plain line per
`interval` seconds instead of carriage-return redraws."""
from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, desc: str, unit: str = "img", initial: int = 0, interval: float = 30.0,
                 enabled: bool = True, stream=None):
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.interval = interval
        self._bar = None
        self._start, self._start_n, self._last = time.monotonic(), initial, 0.0
        if enabled and getattr(self.stream, "isatty", lambda: False)():
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=self.stream,
                             dynamic_ncols=True)

    def update(self, n: int) -> None:
        if n <= 0:
            return
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.enabled and (time.monotonic() - self._last >= self.interval or self.n >= self.total):
            self._last = time.monotonic()
            print(self.line(), file=self.stream, flush=True)

    def line(self) -> str:
        elapsed = time.monotonic() - self._start
        done = self.n - self._start_n
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.n) / rate if rate > 0 else float("nan")
        pct = 100.0 * self.n / max(self.total, 1)
        return (f"{self.desc}: {self.n}/{self.total} {self.unit} ({pct:.1f}%), {rate:.2f} {self.unit}/s, "
                f"elapsed {_hms(elapsed)}, ETA {_hms(eta)}")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _hms(seconds: float) -> str:
    if seconds != seconds:  # NaN: no rate yet
        return "?"
    s = int(round(seconds))
    return f"{s // 3600:d}:{s % 3600 // 60:02d}:{s % 60:02d}"
