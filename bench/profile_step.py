"""Where a training step's GPU time goes: torch.profiler over a few steps of bench_model's step (fwd + bwd +
AdamW, fp32 params, bf16 autocast, regional compile by default), kernels grouped into coarse kinds, per model,
side by side in one run.

    python3 -m bench.profile_step --models DiG-XL/2,DiT-XL/2 --res 512 --batch 32
    python3 -m bench.profile_step --models DiG-XL/2,DiG-XL/2+scan --res 512 --batch 32   # model.scan_in_kernel
    python3 -m bench.profile_step --models DiG-XL/2,DiG-XL/2+mlp_recompute=false --res 256 --batch 32 --graphs

Beside the kernel time, the step's wall time (median of 5). Without --graphs it includes the launch gaps that
the trainer's CUDA graphs remove; --graphs compiles the blocks with them, as the recipes train, for the wall time:
the profiler may miss kernels replayed from graphs recorded before it started, so count kernels without it.
"""
from __future__ import annotations

import argparse
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from .bench_model import build_step, free
from .common import fmt_table, kernel_kind, median, model_options, time_ms

KINDS = [  # (kind, regex over the kernel name), first match wins
    ("gla (ours)", r"^(fwd_kernel|bwd_dq_kernel|bwd_dkv_kernel)$"),
    ("gla (fla)", r"^chunk_(gla|fwd|bwd|local)"),
    ("attention (sdpa)", r"flash|fmha|attention"),
    ("swiglu product (ours)", r"^swiglu_"),  # dig/ops/swiglu_triton.py; DiT's GELU is in fused elementwise
    ("matmul", r"gemm|sm90_xmma|cutlass|nvjet|wgmma|matmul"),
    ("conv", r"conv|depthwise"),
    ("flip (scan reorientation)", r"flip_kernel"),  # aten's copies; inductor's kernels with a fused flip are elementwise
    ("optimizer", r"multi_tensor|adam"),
    ("fused elementwise (inductor)", r"^triton_"),
]


WALL = "STEP (wall ms, median of 5)"


def kind_of(name: str) -> str:
    return kernel_kind(name, KINDS)


def profile_model(name: str, res: int, batch: int, device: torch.device, steps: int, compile_blocks: bool,
                  graphs: bool = False, **overrides) -> tuple[dict, list]:
    model, step, opt = build_step(name, res, batch, device, compile_blocks=compile_blocks, cudagraphs=graphs,
                                  **overrides)
    for _ in range(3):
        step()
    wall_ms = median(time_ms(step, device, warmup=0, repeat=5))
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
        sync()
    per_kind: dict[str, float] = defaultdict(float)
    per_kernel: dict[str, float] = defaultdict(float)
    for evt in prof.key_averages():
        if cuda and evt.device_type != torch.autograd.DeviceType.CUDA:
            continue  # operator events carry their kernels' time too: count kernels only
        us = evt.device_time_total if cuda else evt.self_cpu_time_total  # CPU: a dry run of the plumbing
        if us <= 0:
            continue
        per_kind[kind_of(evt.key)] += us / steps / 1e3
        per_kernel[evt.key] += us / steps / 1e3
    del model, opt, step
    free(device)
    return {**per_kind, WALL: wall_ms}, sorted(per_kernel.items(), key=lambda kv: -kv[1])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="DiG-XL/2,DiT-XL/2", help="comma list; NAME+scan: a DiG with "
                    "model.scan_in_kernel (the scan directions read by the GLA kernels); NAME+KEY=VALUE: a model "
                    "override, e.g. DiG-XL/2+mlp_recompute=false")
    ap.add_argument("--res", type=int, default=512)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--eager", action="store_true", help="no regional compile")
    ap.add_argument("--graphs", action="store_true", help="the compiled blocks with CUDA graphs (reduce-overhead)")
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kinds, tops = {}, {}
    for name in args.models.split(","):
        model, _, options = name.partition("+")
        kinds[name], tops[name] = profile_model(model, args.res, args.batch, device, args.steps, not args.eager,
                                                graphs=args.graphs, **(model_options(options) if options else {}))
    walls = {n: kinds[n].pop(WALL) for n in kinds}
    names = list(kinds)
    rows = [{"kind": k, **{f"{n} ms/step": kinds[n].get(k, 0.0) for n in names}}
            for k in sorted({k for d in kinds.values() for k in d}, key=lambda k: -max(d.get(k, 0) for d in kinds.values()))]
    rows.append({"kind": "TOTAL (kernel time)", **{f"{n} ms/step": sum(kinds[n].values()) for n in names}})
    rows.append({"kind": WALL, **{f"{n} ms/step": walls[n] for n in names}})
    variant = "eager" if args.eager else "regional compile" + (" + CUDA graphs" if args.graphs else "")
    print(f"\nGPU kernel time per step, {args.res} px, batch {args.batch}, {variant}\n"
          + fmt_table(rows, list(rows[0])))
    for n in names:
        print(f"\nTop kernels, {n}\n" + fmt_table([{"kernel": k[:90], "ms/step": v} for k, v in tops[n][:args.top]],
                                                  ["kernel", "ms/step"]))


if __name__ == "__main__":
    main()
