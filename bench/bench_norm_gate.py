"""The GLA layer's output norm and gate, y = rms_norm(o) * weight * silu(gate) per head, at DiG-XL/2's shapes:

    python3 -m bench.bench_norm_gate --out DIR     # on a GPU: [32, 256, 18, 64] (256 px), [32, 1024, 18, 64] (512 px)
    python3 -m bench.bench_norm_gate --quick       # CPU, a tiny shape, eager and inductor only (checks the plumbing)

o and gate in bf16 (fp32 with --quick), weight fp32, eps 1e-6. Forward and forward+backward time per call of:
our Triton kernels (`triton`, dig.ops.norm_gate_triton), the same op called from a torch.compile'd function
(`triton_compiled`: what a compiled DiG block runs), today's torch expression (norm_gate_torch, DiG's
RMSNormSwishGate) compiled by inductor (`inductor`) and run eagerly (`eager`), all measured in one run. Against
the byte floor, the bytes the op must move at least over --bandwidth (default 3.3e12 B/s, an H200's copy rate):
forward reads o, gate and weight and writes y; backward reads o, gate, weight and dy and writes do, dgate and
dweight. `*_floor_x` is a time over its floor, `*_vs_inductor` inductor's time over ours. Times are per call
(DiG-XL/2 makes one call per block, 28 per step), each the median of --repeat timings of --inner back-to-back
calls (one call is ~20 us at 256 px: a single call would time the launch)."""
from __future__ import annotations

import argparse
import json
import os

import torch

from dig.ops.norm_gate_torch import rms_norm_swish_gate_torch
from dig.ops.norm_gate_triton import rms_norm_swish_gate

from .bench_gla import DIG_XL
from .common import command_line, finish_report, fmt_table, time_per_call, versions

HEADS, D = DIG_XL["heads"], DIG_XL["v"]
EPS = 1e-6
GPU_CASES = [(256, 32), (512, 32)]  # (resolution, images per GPU): tokens = (res / 16)^2 with patch 2 on 8x latents
QUICK_CASES = [(64, 2)]


def _variants(device: torch.device) -> dict:
    """name -> fn(o, gate, weight) -> y."""
    out = {}
    if device.type == "cuda":
        out["triton"] = lambda o, g, w: rms_norm_swish_gate(o, g, w, EPS)
        out["triton_compiled"] = torch.compile(lambda o, g, w: rms_norm_swish_gate(o, g, w, EPS), fullgraph=True)
    out["inductor"] = torch.compile(lambda o, g, w: rms_norm_swish_gate_torch(o, g, w, EPS), fullgraph=True)
    out["eager"] = lambda o, g, w: rms_norm_swish_gate_torch(o, g, w, EPS)
    return out


def floor_bytes(o: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor) -> dict[str, int]:
    """The bytes the forward, and forward + backward, must move at least (y, dy, do in o's dtype, dgate in gate's,
    dweight in weight's)."""
    fwd = o.nbytes + gate.nbytes + weight.nbytes + o.nbytes  # read o, gate, weight; write y
    bwd = 2 * o.nbytes + gate.nbytes + weight.nbytes + o.nbytes + gate.nbytes + weight.nbytes  # + read dy
    return {"fwd": fwd, "fwd_bwd": fwd + bwd}


def bench_case(res: int, batch: int, device: torch.device, bandwidth: float, inner: int, repeat: int) -> dict:
    tokens = (res // 16) ** 2
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)
    shape = (batch, tokens, HEADS, D)
    o = torch.randn(shape, device=device, dtype=dtype, generator=gen).requires_grad_()
    gate = torch.randn(shape, device=device, dtype=dtype, generator=gen).requires_grad_()
    weight = (1 + 0.1 * torch.randn(D, device=device, generator=gen)).requires_grad_()
    dy = torch.randn(shape, device=device, dtype=dtype, generator=gen)
    floor = {k: b / bandwidth * 1e3 for k, b in floor_bytes(o, gate, weight).items()}
    row: dict = {"res": res, "batch": batch, "shape": "x".join(map(str, shape)),
                 **{f"floor_{k}_ms": ms for k, ms in floor.items()}}
    with torch.no_grad():
        expected = rms_norm_swish_gate_torch(o, gate, weight, EPS).float()
    for name, fn in _variants(device).items():
        try:
            with torch.no_grad():
                row[f"{name}_max_err"] = (fn(o, gate, weight).float() - expected).abs().max().item()
                fwd = time_per_call(lambda: fn(o, gate, weight), device, inner, repeat)
            fwd_bwd = time_per_call(lambda: torch.autograd.grad(fn(o, gate, weight), (o, gate, weight), dy),
                                    device, inner, repeat)
        except Exception as e:  # noqa: BLE001  reported in the table, the other columns still run
            row[f"{name}_error"] = f"{type(e).__name__}: {e}"[:120]
            continue
        row.update({f"{name}_fwd_ms": fwd, f"{name}_fwd_bwd_ms": fwd_bwd,
                    f"{name}_fwd_floor_x": fwd / floor["fwd"], f"{name}_fwd_bwd_floor_x": fwd_bwd / floor["fwd_bwd"]})
    for d in ("fwd", "fwd_bwd"):
        for name in ("triton", "triton_compiled"):
            if f"{name}_{d}_ms" in row and f"inductor_{d}_ms" in row:
                row[f"{name}_{d}_vs_inductor"] = row[f"inductor_{d}_ms"] / row[f"{name}_{d}_ms"]
    return row


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CPU, a tiny shape, eager and inductor only")
    ap.add_argument("--resolutions", default="", help="comma list to restrict the cases, e.g. 512")
    ap.add_argument("--bandwidth", type=float, default=3.3e12, help="bytes/s for the byte floor (default 3.3e12)")
    ap.add_argument("--inner", type=int, default=20, help="calls per timing")
    ap.add_argument("--repeat", type=int, default=10, help="timings per measurement (the median is reported)")
    ap.add_argument("--out", default=os.environ.get("OUT", ""))
    args = ap.parse_args(argv)
    if not args.quick and not torch.cuda.is_available():
        ap.error("needs a CUDA GPU (the Triton kernels); --quick runs the torch columns on the CPU")
    device = torch.device("cpu" if args.quick else "cuda")
    cases = QUICK_CASES if args.quick else GPU_CASES
    if args.resolutions:
        keep = {int(r) for r in args.resolutions.split(",")}
        cases = [c for c in cases if c[0] in keep]
    inner, repeat = (2, 2) if args.quick else (args.inner, args.repeat)
    rows = []
    for res, batch in cases:
        row = bench_case(res, batch, device, args.bandwidth, inner, repeat)
        rows.append(row)
        print(json.dumps(row), flush=True)
    names = list(_variants(device))
    tables = []
    for d, title in (("fwd", "forward"), ("fwd_bwd", "forward + backward")):
        columns = ["res", "batch", "shape", f"floor_{d}_ms"]
        for n in names:
            columns += [f"{n}_{d}_ms", f"{n}_{d}_floor_x"] + ([f"{n}_{d}_vs_inductor"] if n.startswith("triton")
                                                               else [])
        tables.append(f"rms_norm_swish_gate {title} ({'bf16' if device.type == 'cuda' else 'fp32'} o and gate, "
                      f"fp32 weight, {HEADS} heads, D {D}); floor at {args.bandwidth / 1e12:.2f} TB/s\n"
                      + fmt_table(rows, columns))
    tables.append("Max |y - eager| (forward)\n" + fmt_table(rows, ["res", "batch"] + [f"{n}_max_err" for n in names]))
    command = command_line("bench.bench_norm_gate", argv)
    finish_report(tables, rows, args.out, "norm_gate",
                  {"versions": versions(), "bandwidth": args.bandwidth, "command": command})


if __name__ == "__main__":
    main()
