"""The GLA kernel table at DiG's shapes, forward and backward timed separately:

    python3 -m bench.bench_gla_kernels --out DIR      # on a GPU: DiG-XL/2 heads (18, K 32, V 64), 256-4096 px
    python3 -m bench.bench_gla_kernels --quick        # CPU, tiny shapes, torch backend (checks the plumbing)

Per resolution and images per GPU: our fused Triton kernel with the sequence split across programs as chosen
automatically (`triton`), the same kernel with one program per sequence and head (`triton_1split`), fla's
`chunk_gla` (`fla`), with `--orders` our kernel reading the tokens in DiG's scan orders in place
(`triton_order1` … `triton_order3`: flipped, transposed, transposed + flipped; `model.scan_in_kernel`), the exact
PyTorch implementation where it is affordable, and SDPA at DiT-XL/2's shapes (16
heads, head dim 72), against GLA's byte floor: the bytes the op must move at least over the measured copy
bandwidth (forward: read q, k, g, v, write o; backward: read q, k, g, v, do, write dq, dk, dg, dv). The
backward is timed alone: one forward keeps its graph and the backward runs repeatedly from it."""
from __future__ import annotations

import argparse
import json
import os

import torch
import torch.nn.functional as F

from dig.ops import gla, gla_triton

from .bench_gla import DIG_XL, DIT_XL, gla_floor_bytes
from .common import command_line, copy_bandwidth_gbs, finish_report, fmt_table, median, time_ms, versions

HEADS, K, V = DIG_XL["heads"], DIG_XL["k"], DIG_XL["v"]
DIT_HEADS, DIT_D = DIT_XL["heads"], DIT_XL["d"]
# (resolution, images per GPU): the paper's 32 at 256 px, then about 32k tokens per GPU, as bench.run_all
GPU_CASES = [(256, 32), (256, 128), (512, 32), (1024, 8), (2048, 2), (4096, 1)]
QUICK_CASES = [(64, 2), (128, 1)]


def _variants(device: torch.device, quick: bool, split_counts: tuple[int, ...] = (),
              orders: torch.Tensor | None = None) -> dict:
    """name -> fn(q, k, v, g) -> o, for the GLA implementations measured here. `orders`: [4, T] scan orders."""
    if quick or device.type != "cuda":
        out = {"torch": lambda q, k, v, g: gla(q, k, v, g, backend="torch")[0]}
        if orders is not None:
            out["torch_order2"] = lambda q, k, v, g: gla(q, k, v, g, backend="torch", token_order=orders[2])[0]
        return out
    out = {"triton": lambda q, k, v, g: gla_triton(q, k, v, g)[0],
           "triton_1split": lambda q, k, v, g: gla_triton(q, k, v, g, splits=1)[0]}
    for n in split_counts:  # forced split counts, to tune the automatic choice (gla_triton.automatic_splits)
        out[f"triton_{n}split"] = lambda q, k, v, g, n=n: gla_triton(q, k, v, g, splits=n)[0]
    if orders is not None:  # DiG's scan directions read in place (model.scan_in_kernel)
        for i in (1, 2, 3):
            out[f"triton_order{i}"] = lambda q, k, v, g, i=i: gla_triton(q, k, v, g, token_order=orders[i])[0]
    try:
        from dig.ops.gla_fla import fla_installed
        if fla_installed():
            out["fla"] = lambda q, k, v, g: gla(q, k, v, g, backend="fla")[0]
    except ImportError:
        pass
    return out


def time_fwd_bwd(fn, inputs, cotangent, device, repeat: int) -> tuple[float, float]:
    """(forward ms, backward ms), medians."""
    with torch.no_grad():
        fwd = median(time_ms(lambda: fn(*inputs), device, warmup=3, repeat=repeat))
    out = fn(*inputs)
    bwd = median(time_ms(lambda: torch.autograd.grad(out, inputs, cotangent, retain_graph=True), device,
                         warmup=3, repeat=repeat))
    return fwd, bwd


def bench_case(res: int, batch: int, device: torch.device, copy_gbs: float | None, repeat: int,
               quick: bool, split_counts: tuple[int, ...] = (), with_orders: bool = False) -> dict:
    tokens = (res // 16) ** 2
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, device=device, dtype=dtype, generator=gen)

    row: dict = {"res": res, "batch": batch, "tokens": tokens}
    if device.type == "cuda":
        from dig.ops.gla_triton import automatic_splits
        row["splits"] = automatic_splits(batch * HEADS, tokens,
                                         torch.cuda.get_device_properties(device).multi_processor_count)
    inputs = [rnd(batch, tokens, HEADS, K), rnd(batch, tokens, HEADS, K), rnd(batch, tokens, HEADS, V),
              (F.logsigmoid(rnd(batch, tokens, HEADS, K).float()) / 16).to(dtype)]
    inputs = [x.requires_grad_() for x in inputs]
    do = rnd(batch, tokens, HEADS, V)
    floor = gla_floor_bytes(batch, tokens, HEADS, K, V, itemsize=inputs[0].element_size())
    orders = None
    if with_orders:
        from dig.models.dig import scan_directions
        side = res // 16
        orders = scan_directions((side, side))[0].to(device)
    for name, fn in _variants(device, quick, split_counts, orders).items():
        try:
            fwd, bwd = time_fwd_bwd(fn, inputs, do, device, repeat)
        except Exception as e:  # noqa: BLE001  reported in the table, the other columns still run
            row[f"{name}_error"] = f"{type(e).__name__}: {e}"[:120]
            continue
        row.update({f"{name}_fwd_ms": fwd, f"{name}_bwd_ms": bwd})
        if copy_gbs:
            row[f"{name}_fwd_floor_x"] = fwd / (floor["fwd"] / (copy_gbs * 1e9) * 1e3)
            row[f"{name}_bwd_floor_x"] = bwd / (floor["bwd"] / (copy_gbs * 1e9) * 1e3)
    if copy_gbs:
        row.update({f"floor_{d}_ms": b / (copy_gbs * 1e9) * 1e3 for d, b in floor.items()})
    del inputs, do
    sdpa_inputs = [rnd(batch, DIT_HEADS, tokens, DIT_D).requires_grad_() for _ in range(3)]
    try:
        row["sdpa_fwd_ms"], row["sdpa_bwd_ms"] = time_fwd_bwd(
            F.scaled_dot_product_attention, sdpa_inputs, rnd(batch, DIT_HEADS, tokens, DIT_D), device, repeat)
    except Exception as e:  # noqa: BLE001
        row["sdpa_error"] = f"{type(e).__name__}: {e}"[:120]
    return row


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CPU, tiny shapes, torch backend")
    ap.add_argument("--resolutions", default="", help="comma list to restrict the cases, e.g. 2048,4096")
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--splits", default="", help="also time our kernel at these forced split counts, e.g. 2,4,8 "
                    "(columns triton_<n>split), to tune the automatic split rule")
    ap.add_argument("--orders", action="store_true", help="also time our kernel reading DiG's scan orders in place "
                    "(model.scan_in_kernel)")
    ap.add_argument("--out", default=os.environ.get("OUT", ""))
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    cases = QUICK_CASES if args.quick else GPU_CASES
    if args.resolutions:
        keep = {int(r) for r in args.resolutions.split(",")}
        cases = [c for c in cases if c[0] in keep]
    split_counts = tuple(int(n) for n in args.splits.split(",") if n)
    copy_gbs = copy_bandwidth_gbs(device, 1 << 24 if args.quick else 4 << 30, 2 if args.quick else 10)
    rows = []
    for res, batch in cases:
        row = bench_case(res, batch, device, copy_gbs, 2 if args.quick else args.repeat, args.quick, split_counts,
                         args.orders)
        rows.append(row)
        print(json.dumps(row), flush=True)
    names = list(_variants(device, args.quick, split_counts, torch.zeros(4, 1) if args.orders else None))
    tables = []
    for d in ("fwd", "bwd"):
        columns = ["res", "batch", "tokens", "splits", f"floor_{d}_ms"]
        for n in names:
            columns += [f"{n}_{d}_ms", f"{n}_{d}_floor_x"]
        tables.append(f"GLA {d} ({'bf16' if device.type == 'cuda' else 'fp32'}, {HEADS} heads, K {K}, V {V}) vs SDPA {d} ({DIT_HEADS} heads, d {DIT_D}); "
                      f"copy {copy_gbs:.0f} GB/s\n" + fmt_table(rows, columns + [f"sdpa_{d}_ms"]))
    command = command_line("bench.bench_gla_kernels", argv)
    finish_report(tables, rows, args.out, "gla_kernels", {"versions": versions(), "copy_gbs": copy_gbs,
                                                          "command": command})


if __name__ == "__main__":
    main()
