"""The GEMMs of one DiG GLA layer's input projections with the forget gate's first, 16-column projection (W1) as a
GEMM of its own (today) or packed into the q | k | v | gate GEMM as 16 more columns, forward and backward, bf16,
timed against each other in rotating rounds (one process, one GPU).

    python3 -m bench.forget_gate_gemms --tokens 8192,32768          # 256 px / 32 and 512 px / 32 at DiG-XL/2

separate: y = x Wp^T, lr = x W1^T; dx = dy Wp + dlr W1 (an addmm on the first product), dWp = dy^T x, dW1 = dlr^T x
packed:   [y | lr] = x [Wp; W1]^T; dx = [dy | dlr] [Wp; W1], d[Wp; W1] = [dy | dlr]^T x
Only the GEMMs (and the add) that differ: the gate's 16-to-576 projection and the GLA are the same in both. Plain
aten GEMMs: in a compiled model inductor also pads rows that are not a multiple of 64 bf16 elements (3472 are not)
and copies around a custom operator that takes them, which this does not time (BENCHMARKS.md, sixteenth session).
"""
from __future__ import annotations

import argparse

import torch

from .common import fmt_table, paired_ratios, rotating_rounds, time_per_call


def _blocks(tokens: int, hidden: int, packed_cols: int, rank: int, device: torch.device, inner: int,
            repeat: int) -> dict:
    bf16 = dict(device=device, dtype=torch.bfloat16)
    x = torch.randn(tokens, hidden, **bf16)
    w_all = torch.randn(packed_cols + rank, hidden, **bf16) * hidden ** -0.5
    d_all = torch.randn(tokens, packed_cols + rank, **bf16)
    wp, w1 = w_all[:packed_cols].contiguous(), w_all[packed_cols:].contiguous()
    dy, dlr = d_all[:, :packed_cols].contiguous(), d_all[:, packed_cols:].contiguous()

    def separate():
        y, lr = x @ wp.t(), x @ w1.t()
        dx = torch.addmm(dy @ wp, dlr, w1)
        dwp, dw1 = dy.t() @ x, dlr.t() @ x
        return y, lr, dx, dwp, dw1

    def separate_add():  # autograd's sum of the two uses of x, without fusing it into the GEMM
        y, lr = x @ wp.t(), x @ w1.t()
        dx = dy @ wp + dlr @ w1
        dwp, dw1 = dy.t() @ x, dlr.t() @ x
        return y, lr, dx, dwp, dw1

    def packed():
        y = x @ w_all.t()
        dx = d_all @ w_all
        dw = d_all.t() @ x
        return y, dx, dw

    def gate_only():  # the R columns' own GEMMs, dx's share as a GEMM of its own
        return x @ w1.t(), dlr @ w1, dlr.t() @ x

    fns = {"separate (addmm)": separate, "separate (mm + add)": separate_add, "packed": packed,
           f"the {rank} columns' GEMMs alone": gate_only}
    return {label: (lambda fn=fn: time_per_call(fn, device, inner, repeat)) for label, fn in fns.items()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="8192,32768", help="rows of x (images x tokens per image), comma-separated")
    ap.add_argument("--hidden", type=int, default=1152)
    ap.add_argument("--packed-cols", type=int, default=3456, help="q | k | v | gate columns (DiG-XL/2: 3456)")
    ap.add_argument("--rank", type=int, default=16, help="the forget gate's low rank")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--inner", type=int, default=20, help="calls timed back to back per measurement")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        ap.error("times cuBLAS GEMMs: needs a CUDA GPU")
    device = torch.device("cuda")
    rows = []
    for tokens in (int(t) for t in args.tokens.split(",")):
        blocks = _blocks(tokens, args.hidden, args.packed_cols, args.rank, device, args.inner, repeat=3)
        for fn in blocks.values():
            fn()  # warm-up: cuBLAS heuristics and workspaces
        stats = paired_ratios(rotating_rounds(blocks, args.rounds), base="separate (addmm)")
        for label, s in stats.items():
            rows.append({"tokens": tokens, "path": label, "us": f"{1e3 * s['ms']:.1f}",
                         "/ separate (addmm)": f"{s['ratio']:.3f} ({s['p10']:.3f}-{s['p90']:.3f})"})
    print(fmt_table(rows, ["tokens", "path", "us", "/ separate (addmm)"]))


if __name__ == "__main__":
    main()
