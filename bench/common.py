"""Shared benchmark plumbing: device ceilings (bf16 matmul rate, copy bandwidth), event timing, environment."""
from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import re
import statistics
import sys
from typing import Callable

import torch


def command_line(module: str, argv: list[str] | None) -> str:
    """The command that ran `module`'s main(argv) for a results file: argv as given, else the process's own."""
    return f"python3 -m {module} " + " ".join(sys.argv[1:] if argv is None else argv)


def versions() -> dict[str, str]:
    info = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "python": platform.python_version(), "torch": torch.__version__}
    for dist in ("triton", "fla-core", "flash-linear-attention", "deepspeed"):
        try:
            info[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda or "?"
    return info


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, warmup: int = 2, repeat: int = 5) -> list[float]:
    """Per-call wall times in ms (CUDA events on GPU, perf_counter elsewhere) after `warmup` untimed calls."""
    import time

    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def time_per_call(fn: Callable[[], object], device: torch.device, inner: int, repeat: int) -> float:
    """ms per call: the median over `repeat` timings of `inner` calls back to back (for calls of tens of us, where
    a single timed call would measure its launch)."""
    return median(time_ms(lambda: [fn() for _ in range(inner)], device, warmup=3, repeat=repeat)) / inner


def rotating_rounds(blocks: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Each block (a callable that times something and returns its ms) once per round, for `rounds` rounds; round r
    starts with block r mod len(blocks), so that no block always runs first or after the same one. Returns
    label -> its ms in each round. For differences of a few %: the drift of the GPU's clocks and of the host over
    a run moves every block of a round alike, and cancels in the per-round ratios (`paired_ratios`)."""
    labels = list(blocks)
    times: dict[str, list[float]] = {label: [] for label in labels}
    for r in range(rounds):
        k = r % len(labels)
        for label in labels[k:] + labels[:k]:
            times[label].append(blocks[label]())
    return times


def quantile(xs: list[float], q: float) -> float:
    """The q-quantile of xs by linear interpolation between order statistics."""
    ys = sorted(xs)
    pos = q * (len(ys) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ys) - 1)
    return ys[lo] + (ys[hi] - ys[lo]) * (pos - lo)


def paired_ratios(times: dict[str, list[float]], base: str) -> dict[str, dict[str, float]]:
    """label -> the median of its per-round ms, and the median, 10th and 90th percentile of its per-round ratios
    to `base` (rounds paired by index, as `rotating_rounds` returns them)."""
    out = {}
    for label, ms in times.items():
        ratios = [a / b for a, b in zip(ms, times[base])]
        out[label] = {"ms": statistics.median(ms), "ratio": statistics.median(ratios),
                      "p10": quantile(ratios, 0.1), "p90": quantile(ratios, 0.9)}
    return out


def matmul_peak_tflops(device: torch.device, n: int = 8192, repeat: int = 10) -> float:
    """Measured bf16 dense matmul rate on random data (the MFU denominator)."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    ms = median(time_ms(lambda: a @ b, device, warmup=3, repeat=repeat))
    return 2 * n ** 3 / (ms * 1e-3) / 1e12


def copy_bandwidth_gbs(device: torch.device, nbytes: int = 4 << 30, repeat: int = 10) -> float:
    """Device-to-device copy, counting bytes read plus bytes written."""
    src = torch.empty(nbytes // 2, device=device, dtype=torch.bfloat16).normal_()
    dst = torch.empty_like(src)
    ms = median(time_ms(lambda: dst.copy_(src), device, warmup=3, repeat=repeat))
    return 2 * nbytes / (ms * 1e-3) / 1e9


def labelled_models(text: str, option: str, noun: str, by_position: bool = False,
                    hint: str = "") -> list[tuple[str, str, dict]]:
    """"DiG-XL/2,DiG-XL/2+mlp_kernel=false" (the value of `option`) -> [(label, model name, model overrides), ...]:
    at least two, to be timed against each other (bench.ab_step, bench.ab_train). Labels must differ, unless
    `by_position`: then each starts with its position, "1:DiG-XL/2" (items told apart otherwise)."""
    items = []
    for i, item in enumerate(filter(None, (s.strip() for s in text.split(","))), start=1):
        name, _, options = item.partition("+")
        items.append((f"{i}:{item}" if by_position else item, name, model_options(options) if options else {}))
    if len(items) < 2:
        raise SystemExit(f"{option}: give at least two {noun}s to compare, got {text!r}")
    if len({label for label, _, _ in items}) != len(items):
        raise SystemExit(f"{option}: the same {noun} twice in {text!r}{hint}")
    return items


def add_round_options(ap, warmup: int, rounds: int, what: str) -> None:
    """The options of a benchmark timing several `what`s against each other in rotating rounds."""
    ap.add_argument("--warmup", type=int, default=warmup, help=f"untimed steps of each {what} after building it "
                    "(>= 1: the first compiles, and with CUDA graphs records)")
    ap.add_argument("--rounds", type=int, default=None, help=f"default {rounds} (3 with --quick)")
    ap.add_argument("--steps-per-round", type=int, default=3)
    ap.add_argument("--settle", type=int, default=1, help="untimed steps before each timed block")
    ap.add_argument("--quick", action="store_true", help="CPU dry run: a tiny DiG against itself with an override")
    ap.add_argument("--out", default=os.environ.get("OUT", ""))


def check_round_options(ap, args, rounds: int) -> None:
    """--rounds' default (unless --quick set it) and the options' ranges."""
    args.rounds = rounds if args.rounds is None else args.rounds
    if args.warmup < 1 or args.rounds < 1 or args.steps_per_round < 1 or args.settle < 0:
        ap.error("--warmup, --rounds and --steps-per-round must be >= 1, --settle >= 0")


def model_options(text: str, first: str | None = None) -> dict:
    """Model overrides from OPTION+OPTION+... where an option is `scan` (scan_in_kernel) or KEY=VALUE (VALUE true,
    false, a number, or text); with `first`, the first option is that key's value (e.g. the GLA backend)."""
    options = text.split("+")
    overrides: dict = {}
    if first is not None:
        overrides[first] = options.pop(0)
    for option in options:
        if option == "scan":
            overrides["scan_in_kernel"] = True
            continue
        key, sep, value = option.partition("=")
        if not sep or not key:
            raise SystemExit(f"{option!r} in {text!r} is neither 'scan' nor KEY=VALUE")
        overrides[key] = literal(value)
    return overrides


def literal(value: str):
    """A command-line value as true/false, an int, a float, or the text itself."""
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def kernel_kind(name: str, kinds: list[tuple[str, str]]) -> str:
    """The first kind of `kinds` ((kind, regex over the kernel name) pairs) whose regex finds `name`, else "other"."""
    for kind, pattern in kinds:
        if re.search(pattern, name, re.IGNORECASE):
            return kind
    return "other"


def fmt_table(rows: list[dict], columns: list[str]) -> str:
    """Markdown table of `rows` restricted to `columns` (missing cells blank)."""
    def cell(v):
        if v is None:
            return ""
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def finish_report(tables: list[str], rows: list[dict], out: str | None, stem: str, payload: dict) -> str:
    """Append an errors table (the rows' `*_error` entries, if any), print the tables, and with `out` write
    `<stem>.json` (payload + rows) and `<stem>.md` (the tables) there. Returns the printed text."""
    errors = [{"res": r["res"], "batch": r["batch"], "error": v} for r in rows for k, v in r.items()
              if k.endswith("_error")]
    if errors:
        tables = tables + ["Errors\n" + fmt_table(errors, ["res", "batch", "error"])]
    text = "\n\n".join(tables)
    print(text)
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, f"{stem}.json"), "w") as f:
            json.dump({**payload, "rows": rows}, f, indent=1)
        with open(os.path.join(out, f"{stem}.md"), "w") as f:
            f.write(text + "\n")
    return text
