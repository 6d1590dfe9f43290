"""Launch settings of the fused Triton GLA kernels (`dig.ops.gla_triton`): forward and forward+backward time per
(chunk size, num_warps) at DiG-XL/2's training shapes (18 heads, K 32, V 64, bf16, ~32k tokens per call), side
by side in one run. The module defaults CHUNK and NUM_WARPS come from this table (BENCHMARKS.md).

    python3 -m bench.tune_gla_triton                                   # on a GPU machine
    python3 -m bench.tune_gla_triton --configs 16x4,32x4 --res 256,512
"""
from __future__ import annotations

import argparse
import importlib

import torch
import torch.nn.functional as F

from dig.ops import gla

from .common import fmt_table, median, time_ms

SHAPES = {256: (128, 256), 512: (32, 1024), 1024: (8, 4096), 2048: (2, 16384), 4096: (1, 65536)}  # batch, tokens


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="16x4,32x4,64x4,32x2,32x8", help="CHUNKxNUM_WARPS list")
    ap.add_argument("--res", default="256,512,1024", help="resolutions (DiG-XL/2 batch ~32k tokens)")
    ap.add_argument("--repeat", type=int, default=10)
    args = ap.parse_args(argv)
    device = torch.device("cuda")
    module = importlib.import_module("dig.ops.gla_triton")  # the package re-exports a function of that name
    defaults = module.CHUNK, module.NUM_WARPS
    rows = []
    for res in [int(r) for r in args.res.split(",")]:
        batch, tokens = SHAPES[res]
        gen = torch.Generator(device=device).manual_seed(0)

        def rnd(*shape):
            return torch.randn(*shape, device=device, dtype=torch.bfloat16, generator=gen)

        q, k, v = rnd(batch, tokens, 18, 32), rnd(batch, tokens, 18, 32), rnd(batch, tokens, 18, 64)
        g = (F.logsigmoid(rnd(batch, tokens, 18, 32).float()) / 16).to(torch.bfloat16)
        inputs = [x.requires_grad_() for x in (q, k, v, g)]
        do = rnd(batch, tokens, 18, 64)
        row = {"res": res, "batch": batch, "tokens": tokens}
        for config in args.configs.split(","):
            module.CHUNK, module.NUM_WARPS = (int(x) for x in config.split("x"))

            def fwd():
                with torch.no_grad():
                    return gla(*inputs, backend="triton")

            def fwd_bwd():
                return torch.autograd.grad(gla(*inputs, backend="triton")[0], inputs, do)

            row[f"{config}_fwd_ms"] = median(time_ms(fwd, device, warmup=3, repeat=args.repeat))
            row[f"{config}_fwd_bwd_ms"] = median(time_ms(fwd_bwd, device, warmup=3, repeat=args.repeat))
        rows.append(row)
        print(row, flush=True)
    module.CHUNK, module.NUM_WARPS = defaults
    print(fmt_table(rows, list(rows[0])))


if __name__ == "__main__":
    main()
