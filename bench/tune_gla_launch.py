"""Per-kernel launch options of the fused Triton GLA kernels (`dig.ops.gla_triton.LAUNCH_BUSY`): each of the three
kernels (fwd, bwd_dq, bwd_dkv) timed under each option set, the other two as the module chooses, at DiG-XL/2's
shapes (18 heads, K 32, V 64, bf16), side by side in one process, with the registers and spills Triton reports.

Why: at the paper's 32 images per GPU a layer is 576 programs for 132 SMs (4.4 per SM), and how many programs an
SM holds at once is set by registers per thread x threads per program. The backward dk/dv/dg kernel uses 255
registers with 4 warps (2 programs per SM: 3 rounds of programs), the others 132-165 (3 per SM: 2 rounds).
`maxnreg` caps registers (spilling the rest), `num_warps` changes threads per program. The bwd_dq and bwd_dkv
rows time the whole backward (both kernels), so their differences are that one kernel's. The option sets of a
kernel take turns in --rounds rounds (rotating order; each turn the median of --repeat calls): `ms` is the median
over rounds, `vs_first` the median of the per-round ratios to the first set, p10-p90 their spread. (Timed one
after the other, identical launches differed by more than the options did: the tenth session's table.)

    python3 -m bench.tune_gla_launch --out DIR            # on a GPU machine
    python3 -m bench.tune_gla_launch --configs w4,w4r128,w8 --cases 256x32

Option sets: w<num_warps>[c<chunk>][r<maxnreg>][s<num_stages>][p][t|m|b][@packed], e.g. w4r128s2, w2c32; c: that
kernel's chunk of tokens (its BT; the module's CHUNK, 16, otherwise: no kernel depends on another's chunk when the
sequence is not split, as here); p: the forward kernel's
PREFETCH, each chunk's loads issued one chunk ahead (Triton's pipeliner leaves the q/k/v loads synchronous; the
backward sweeps had it too, measured slower on an H200, and dropped it); t, m, b: the kernel's dots in
DIG_GLA_DOTS_16BIT's modes tf32, mixed (its FAST_PRECISION dots on bf16 operands) or bf16 (every dot); without one,
the mode the module runs (DIG_GLA_DOTS_16BIT, default mixed), as in `auto`: what the module chooses for the shape.
`@packed`: q, k and v are columns of one [B, T, 2HK + 2HV] tensor and dq, dk, dv are written into the columns of
another, as DiG's packed projections (`model.overrides.packed_projections`, the default) hand them to the kernels,
e.g. `--configs auto,auto@packed` times that layout against contiguous tensors (2026-11-30: the same time).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import json
import os
import re

import torch
import torch.nn.functional as F

from dig.ops.token_rows import readable_in_place, unpack_qkvz

from .common import command_line, fmt_table, median, paired_ratios, rotating_rounds, time_ms, versions

HEADS, K, V = 18, 32, 64
DEFAULT_CASES = "256x32,256x128,512x32,1024x8"
DEFAULT_CONFIGS = "w4,auto,w4p,w4r128,w4r128p,w4r96,w4r96p,w2,w2p,w8p"


PACKED_WIDTH = 2 * HEADS * K + 2 * HEADS * V  # DiG-XL/2's packed projections: q | k | v | gate


def parse_layout(text: str) -> tuple[str, bool]:
    """"w1@packed" -> ("w1", True): the option set, and whether q, k, v are DiG's packed projections' columns."""
    config, _, layout = text.partition("@")
    if layout not in ("", "packed"):
        raise SystemExit(f"bad option set {text!r}: the only layout suffix is @packed")
    return config, layout == "packed"


def parse_config(text: str) -> dict | None:
    text = parse_layout(text)[0]
    if text == "auto":
        return None
    m = re.fullmatch(r"w(?P<warps>\d+)(?:c(?P<chunk>\d+))?(?:r(?P<regs>\d+))?(?:s(?P<stages>\d+))?(?P<prefetch>p)?"
                     r"(?P<dots>[tmb])?", text)
    if not m:
        raise SystemExit(f"bad option set {text!r}: expected w<num_warps>[c<chunk>][r<maxnreg>][s<num_stages>][p][t|m|b], "
                         "e.g. w4r128p")
    options = {"num_warps": int(m["warps"])}
    if m["chunk"]:
        chunk = int(m["chunk"])
        if chunk < 16 or chunk & (chunk - 1):
            raise SystemExit(f"bad option set {text!r}: the chunk must be a power of two >= 16 (tl.dot's smallest tile)")
        options["BT"] = chunk
    if m["dots"]:
        mode = {"t": "tf32", "m": "mixed", "b": "bf16"}[m["dots"]]
        options["PRECISION"], options["FAST_PRECISION"] = importlib.import_module("dig.ops.gla_triton").DOT_MODES[mode]
    if m["prefetch"]:
        options["PREFETCH"] = True
    if m["regs"]:
        options["maxnreg"] = int(m["regs"])
    if m["stages"]:
        options["num_stages"] = int(m["stages"])
    return options


def _binaries(kernel) -> list:
    """The kernel's compiled binaries, where this Triton exposes them (its caches are not an API)."""
    try:
        return [b for cache in kernel.device_caches.values() for b in cache[0].values()]
    except Exception:  # noqa: BLE001
        return []


def _usage(binary) -> tuple[int | None, int | None]:
    try:
        binary._init_handles()
        return binary.n_regs, binary.n_spills
    except Exception:  # noqa: BLE001
        return None, None


def _warm_clocks(device: torch.device, seconds: float = 2.0) -> None:
    """Busy the GPU so that the first timed kernel does not run at idle clocks."""
    import time

    x = torch.randn(4096, 4096, device=device, dtype=torch.bfloat16)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for _ in range(20):
            x = (x @ x).clamp_(-1, 1)
        torch.cuda.synchronize(device)


def bench_case(res: int, batch: int, configs: list[str], repeat: int, device: torch.device,
               rounds: int = 5) -> list[dict]:
    mod = importlib.import_module("dig.ops.gla_triton")  # the package re-exports a function of that name
    kern = importlib.import_module("dig.ops.gla_triton_kernels")

    tokens = (res // 16) ** 2
    gen = torch.Generator(device=device).manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, device=device, dtype=torch.bfloat16, generator=gen)

    q, k, v = rnd(batch, tokens, HEADS, K), rnd(batch, tokens, HEADS, K), rnd(batch, tokens, HEADS, V)
    g = (F.logsigmoid(rnd(batch, tokens, HEADS, K).float()) / 16).to(torch.bfloat16)
    do = rnd(batch, tokens, HEADS, V)
    packed = torch.empty(batch, tokens, PACKED_WIDTH, device=device, dtype=torch.bfloat16)
    sliced = tuple(part.copy_(x) for part, x in zip(unpack_qkvz(packed, HEADS, K), (q, k, v)))  # the same values
    assert all(readable_in_place(x) for x in sliced), "the kernels would copy the slices"
    inputs = {False: (q, k, v), True: sliced}
    packed_grad = unpack_qkvz(torch.empty_like(packed), HEADS, K)[:3]  # dq, dk, dv written into their columns
    scale = K ** -0.5

    def forward(layout):
        return mod._forward(*inputs[layout], g, scale, None, False, 1, None)

    def backward(layout):  # both backward kernels: a row varies one of them
        return mod._backward(*inputs[layout], g, None, scale, do, None, False, 1, None,
                             grads_into=packed_grad if layout else None)

    calls = {"fwd": forward, "bwd_dq": backward, "bwd_dkv": backward}
    jit = {"fwd": kern.fwd_kernel, "bwd_dq": kern.bwd_dq_kernel, "bwd_dkv": kern.bwd_dkv_kernel}
    rows = []
    usage = {}  # (kernel, tokens, option set) -> (registers, spills): a shape seen before compiles nothing new
    saved = dict(mod.LAUNCH_OVERRIDE)

    @contextlib.contextmanager
    def launched_with(name, options):
        mod.LAUNCH_OVERRIDE.clear()
        mod.LAUNCH_OVERRIDE.update(saved)
        if options is not None:
            mod.LAUNCH_OVERRIDE[name] = options
        try:
            yield
        finally:
            mod.LAUNCH_OVERRIDE.clear()
            mod.LAUNCH_OVERRIDE.update(saved)

    for name, call in calls.items():
        candidates = {}  # option set -> (options, its row): those that compiled
        for config in configs:
            options = parse_config(config)
            if options is not None and options.get("PREFETCH") and name != "fwd":
                continue  # only the forward kernel has the option
            row = {"res": res, "batch": batch, "programs": batch * HEADS, "kernel": name, "config": config}
            layout = parse_layout(config)[1]
            try:
                with launched_with(name, options):
                    before = {id(b) for b in _binaries(jit[name])}
                    call(layout)
                    new = [b for b in _binaries(jit[name]) if id(b) not in before]
            except Exception as e:  # noqa: BLE001  a config Triton refuses is a row, not the end of the run
                row["error"] = f"{type(e).__name__}: {e}"[:160]
                rows.append(row)
                print(json.dumps(row), flush=True)
                continue
            if new:
                usage[name, tokens, config] = _usage(new[-1])
            row["regs"], row["spills"] = usage.get((name, tokens, config), (None, None))
            candidates[config] = (options, layout, row)
        if not candidates:
            continue

        def block(options, layout, call=call, name=name):
            with launched_with(name, options):
                return median(time_ms(lambda: call(layout), device, warmup=1, repeat=repeat))

        # the option sets take turns, round after round, so that the clocks' drift does not favour the first ones
        times = rotating_rounds({c: functools.partial(block, options, layout)
                                 for c, (options, layout, _) in candidates.items()}, rounds)
        stats = paired_ratios(times, next(iter(candidates)))
        for config, (_, _, row) in candidates.items():
            row.update(ms=stats[config]["ms"], vs_first=stats[config]["ratio"], p10=stats[config]["p10"],
                       p90=stats[config]["p90"])
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default=DEFAULT_CONFIGS, help="option sets; the first is the reference")
    ap.add_argument("--cases", default=DEFAULT_CASES, help="RESxIMAGES list")
    ap.add_argument("--repeat", type=int, default=6, help="calls timed per option set and round (their median)")
    ap.add_argument("--rounds", type=int, default=5, help="rounds in which every option set takes its turn")
    ap.add_argument("--out", default=os.environ.get("OUT", ""))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench.tune_gla_launch times Triton kernels and needs a CUDA GPU")
    device = torch.device("cuda")
    configs = args.configs.split(",")
    for c in configs:
        parse_config(c)
    rows = []
    _warm_clocks(device)
    for case in args.cases.split(","):
        res, batch = (int(x) for x in case.split("x"))
        rows += bench_case(res, batch, configs, args.repeat, device, args.rounds)
    text = fmt_table(rows, ["res", "batch", "programs", "kernel", "config", "regs", "spills", "ms", "vs_first", "p10",
                            "p90"])
    print(text)
    best = {}
    for r in rows:
        key = (r["res"], r["batch"], r["kernel"])
        if "ms" in r and (key not in best or r["ms"] < best[key]["ms"]):
            best[key] = r
    summary = fmt_table(list(best.values()), ["res", "batch", "kernel", "config", "ms", "vs_first"])
    print("\nFastest per case and kernel\n" + summary)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "gla_launch.json"), "w") as f:
            json.dump({"versions": versions(), "rows": rows,
                       "command": command_line("bench.tune_gla_launch", argv)}, f, indent=1)
        with open(os.path.join(args.out, "gla_launch.md"), "w") as f:
            f.write(text + "\n\nFastest per case and kernel\n" + summary + "\n")


if __name__ == "__main__":
    main()
