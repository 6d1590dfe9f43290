"""Where a training step's GPU time goes: torch.profiler over a few steps of bench_model's step (fwd + bwd +
AdamW, fp32 params, bf16 autocast, regional compile by default), kernels grouped into coarse kinds, per model,
side by side in one run.

    python3 -m bench.profile_step --models DiG-XL/2,DiT-XL/2 --res 512 --batch 32
    python3 -m bench.profile_step --models DiG-XL/2,DiG-XL/2+scan --res 512 --batch 32   # model.scan_in_kernel
    python3 -m bench.profile_step --models DiG-XL/2,DiG-XL/2+unfused --res 256 --batch 32

NAME+unfused: DiG's GLA layer as it was before its five input projections became one GEMM (kept here for
before/after in one run). Beside the kernel time, the step's wall time (median of 5, no CUDA graphs).
"""
from __future__ import annotations

import argparse
import re
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from .bench_model import build, free, train_step_fn
from .common import fmt_table, median, time_ms

KINDS = [  # (kind, regex over the kernel name), first match wins
    ("gla (ours)", r"^(fwd_kernel|bwd_dq_kernel|bwd_dkv_kernel)$"),
    ("gla (fla)", r"^chunk_(gla|fwd|bwd|local)"),
    ("attention (sdpa)", r"flash|fmha|attention"),
    ("matmul", r"gemm|sm90_xmma|cutlass|nvjet|wgmma|matmul"),
    ("conv", r"conv|depthwise"),
    ("flip (scan reorientation)", r"flip"),
    ("optimizer", r"multi_tensor|adam"),
    ("fused elementwise (inductor)", r"^triton_"),
]


WALL = "STEP (wall ms, median of 5)"


def kind_of(name: str) -> str:
    for kind, pattern in KINDS:
        if re.search(pattern, name, re.IGNORECASE):
            return kind
    return "other"


def _unfused_gla_forward(self, x, token_order=None):
    """GatedLinearAttention.forward before the fused input projection: one GEMM per projection."""
    import torch.nn.functional as F

    from dig.models.dig import _gla

    n, t, _ = x.shape
    if torch.is_autocast_enabled(x.device.type):
        x = x.to(torch.get_autocast_dtype(x.device.type))
    heads = lambda z: z.reshape(n, t, self.num_heads, -1)  # noqa: E731
    q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
    gk = F.logsigmoid(heads(self.gk_proj(x))) / self.gate_logit_normalizer
    o, _ = _gla(q, k, v, gk, self.backend, token_order)
    o = self.g_norm_swish_gate(o, heads(self.g_proj(x)))
    return self.o_proj(o.reshape(n, t, -1))


def profile_model(name: str, res: int, batch: int, device: torch.device, steps: int, compile_blocks: bool,
                  unfused: bool = False, **overrides) -> tuple[dict, list]:
    import types

    from dig.models.dig import GatedLinearAttention

    model = build(name, res, device, compile_blocks=False, **overrides)
    if unfused:
        for module in model.modules():
            if isinstance(module, GatedLinearAttention):
                module.forward = types.MethodType(_unfused_gla_forward, module)
    if compile_blocks:
        model.compile_blocks()
    step, opt = train_step_fn(model, batch, device)
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
                    "model.scan_in_kernel (the scan directions read by the GLA kernels); NAME+unfused: one GEMM per "
                    "GLA input projection, as before")
    ap.add_argument("--res", type=int, default=512)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--eager", action="store_true", help="no regional compile")
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kinds, tops = {}, {}
    for name in args.models.split(","):
        model, *options = name.split("+")
        unknown = set(options) - {"scan", "unfused"}
        if unknown:
            raise SystemExit(f"unknown model option(s) {sorted(unknown)} in {name!r}: expected +scan, +unfused")
        kinds[name], tops[name] = profile_model(model, args.res, args.batch, device, args.steps, not args.eager,
                                                unfused="unfused" in options,
                                                **({"scan_in_kernel": True} if "scan" in options else {}))
    walls = {n: kinds[n].pop(WALL) for n in kinds}
    names = list(kinds)
    rows = [{"kind": k, **{f"{n} ms/step": kinds[n].get(k, 0.0) for n in names}}
            for k in sorted({k for d in kinds.values() for k in d}, key=lambda k: -max(d.get(k, 0) for d in kinds.values()))]
    rows.append({"kind": "TOTAL (kernel time)", **{f"{n} ms/step": sum(kinds[n].values()) for n in names}})
    rows.append({"kind": WALL, **{f"{n} ms/step": walls[n] for n in names}})
    print(f"\nGPU kernel time per step, {args.res} px, batch {args.batch}, "
          f"{'eager' if args.eager else 'regional compile'}\n" + fmt_table(rows, list(rows[0])))
    for n in names:
        print(f"\nTop kernels, {n}\n" + fmt_table([{"kernel": k[:90], "ms/step": v} for k, v in tops[n][:args.top]],
                                                  ["kernel", "ms/step"]))


if __name__ == "__main__":
    main()
