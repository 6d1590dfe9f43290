"""DiG's depthwise 3x3 convolution over the token grid at DiG-XL/2's shapes (C = 1152), ours against cuDNN:

    python3 -m bench.bench_dwconv --out DIR      # on a GPU: 256 px / 32 images ... 4096 px / 1 image
    python3 -m bench.bench_dwconv --quick        # CPU, a tiny shape, the cuDNN column only (checks the plumbing)

x: [N, H, W, C] channels-last tokens in bf16 (fp32 with --quick), weight [C, 1, 3, 3] and bias in x's dtype (what
autocast hands a convolution). Measured in one run, forward and forward + backward, per call (DiG-XL/2 makes one
per block, 28 per step):
  - `triton`: our kernels (dig.ops.dwconv_triton; the operator's backward as DIG_DWCONV_BACKWARD says);
  - `cudnn`: F.conv2d with its bias on the channels-last view (dig.ops.dwconv_torch), as eager PyTorch runs it:
    cuDNN's convolution, then the bias added in a pass of its own;
  - `cudnn_nobias`: the same without the bias: **what a compiled DiG block pays**, since inductor calls the
    convolution without its bias and folds the bias into a neighbouring fused kernel (the step's profile: 0.070
    ms per forward at 512 px / 32, where `cudnn` measures 0.173). `triton_*_vs_cudnn` is against this one.
Each in GPU kernel time (torch.profiler over --inner calls: what a CUDA-graphed step pays) and wall time (median of
--repeat timings of --inner back-to-back calls, host launches included: at small shapes the host's launches can
take longer than the GPU's work). The byte floor over --bandwidth: the forward reads x and writes y, the backward
reads x and dy and writes dx (weights and partial sums are negligible); `*_floor_x` is a kernel time over it.
--settings adds columns with the kernels' module settings (tile sizes, warps, rows per program, BACKWARD)
replaced, for tuning them side by side."""
from __future__ import annotations

import argparse
import json
import os

import torch

from dig.ops.dwconv_torch import depthwise_conv3x3_torch
from dig.ops import dwconv_triton
from dig.ops.dwconv_triton import depthwise_conv3x3

from .common import command_line, finish_report, fmt_table, time_per_call, versions

C = 1152  # DiG-XL/2's width
GPU_CASES = [(256, 32), (512, 32), (1024, 8), (2048, 2), (4096, 1)]  # (resolution, images per GPU)
QUICK_CASES = [(64, 2)]


class _Settings:
    """dig.ops.dwconv_triton's module settings (TILE, BWD_TILE, BACKWARD, ...) replaced while in the block."""

    def __init__(self, settings: dict):
        self.settings, self.saved = settings, {}

    def __enter__(self):
        self.saved = {k: getattr(dwconv_triton, k) for k in self.settings}
        for k, v in self.settings.items():
            setattr(dwconv_triton, k, v)

    def __exit__(self, *exc):
        for k, v in self.saved.items():
            setattr(dwconv_triton, k, v)


def parse_settings(text: str) -> dict[str, dict]:
    """"BWD_TILE=2048,BWD_WARPS=8;FWD_ROWS=1" -> {"triton[BWD_TILE=2048,BWD_WARPS=8]": {...}, ...}."""
    out = {}
    for group in filter(None, text.split(";")):
        settings = {}
        for item in group.split(","):
            name, _, value = item.partition("=")
            if not hasattr(dwconv_triton, name) or not name.isupper():
                raise SystemExit(f"--settings: dig.ops.dwconv_triton has no setting {name!r}")
            settings[name] = int(value) if value.lstrip("-").isdigit() else value
        out[f"triton[{group}]"] = settings
    return out


def _variants(device: torch.device, extra: dict[str, dict] | None = None) -> dict:
    """name -> (fn(x, w, b) -> y, the module settings to run it under)."""
    out = {"triton": (depthwise_conv3x3, {})} if device.type == "cuda" else {}
    if device.type == "cuda":
        out.update({name: (depthwise_conv3x3, settings) for name, settings in (extra or {}).items()})
    out["cudnn"] = (depthwise_conv3x3_torch, {})
    # What a compiled DiG block runs: inductor calls the convolution without its bias and adds the bias inside a
    # neighbouring fused kernel, where it costs no extra pass (the bias gradient is one of its fused reductions)
    out["cudnn_nobias"] = (lambda x, w, b: depthwise_conv3x3_torch(x, w, None), {})
    return out


def kernel_ms_per_call(fn, device: torch.device, inner: int, breakdown: list | None = None) -> float | None:
    """GPU time per call of the kernels (and copies) `inner` calls launch, from torch.profiler: what a CUDA-graphed
    training step pays. The wall time per call above also counts the host's launches, which at small shapes
    (one call of ~50 us at 256 px) can exceed the GPU's work."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(inner):
            fn()
        torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    total_us = sum(e.device_time_total for e in kernels)
    if breakdown is not None:  # the kernels by time, "name: ms per call", to tell cuDNN's dx from its weight gradient
        for e in sorted(kernels, key=lambda e: -e.device_time_total)[:5]:
            breakdown.append(f"{e.key[:60]}: {e.device_time_total / 1e3 / inner:.4f}")
    return total_us / 1e3 / inner


def bench_case(res: int, batch: int, device: torch.device, bandwidth: float, inner: int, repeat: int,
               extra: dict[str, dict] | None = None) -> dict:
    side = res // 16  # 8x latents, patch 2
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)
    shape = (batch, side, side, C)
    x = torch.randn(shape, device=device, dtype=dtype, generator=gen).requires_grad_()
    weight = (0.3 * torch.randn(C, 1, 3, 3, device=device, generator=gen)).to(dtype).requires_grad_()
    bias = (0.1 * torch.randn(C, device=device, generator=gen)).to(dtype).requires_grad_()
    dy = torch.randn(shape, device=device, dtype=dtype, generator=gen)
    floor = {"fwd": 2 * x.nbytes / bandwidth * 1e3, "fwd_bwd": 5 * x.nbytes / bandwidth * 1e3}
    row: dict = {"res": res, "batch": batch, "shape": "x".join(map(str, shape)),
                 **{f"floor_{k}_ms": ms for k, ms in floor.items()}}
    with torch.no_grad():
        expected = depthwise_conv3x3_torch(x.double(), weight.double(), bias.double())
    for name, (fn, settings) in _variants(device, extra).items():
        try:
            with _Settings(settings), torch.no_grad():
                row[f"{name}_max_err"] = (fn(x, weight, bias).double() - expected).abs().max().item()
            calls = {"fwd": lambda: _no_grad(fn, x, weight, bias),
                     "fwd_bwd": lambda: torch.autograd.grad(fn(x, weight, bias), (x, weight, bias), dy,
                                                            allow_unused=True)}
            for d, call in calls.items():
                with _Settings(settings):  # (the backward reads them too)
                    row[f"{name}_{d}_ms"] = time_per_call(call, device, inner, repeat)
                    breakdown: list[str] = []
                    kernel = kernel_ms_per_call(call, device, inner, breakdown)
                row[f"{name}_{d}_kernel_ms"] = kernel
                if breakdown:
                    row[f"{name}_{d}_kernels"] = breakdown
                row[f"{name}_{d}_floor_x"] = (kernel or row[f"{name}_{d}_ms"]) / floor[d]
        except Exception as e:  # noqa: BLE001  reported in the table, the other columns still run
            row[f"{name}_error"] = f"{type(e).__name__}: {e}"[:120]
    for d in ("fwd", "fwd_bwd"):
        for name in _variants(device, extra):
            base = row.get(f"cudnn_nobias_{d}_kernel_ms")
            if name.startswith("triton") and row.get(f"{name}_{d}_kernel_ms") and base:
                row[f"{name}_{d}_vs_cudnn"] = base / row[f"{name}_{d}_kernel_ms"]
    return row


def _no_grad(fn, *args):
    with torch.no_grad():
        return fn(*args)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CPU, a tiny shape, the cuDNN column only")
    ap.add_argument("--resolutions", default="", help="comma list to restrict the cases, e.g. 256,1024")
    ap.add_argument("--bandwidth", type=float, default=3.3e12, help="bytes/s for the byte floor (default 3.3e12)")
    ap.add_argument("--inner", type=int, default=20, help="calls per timing")
    ap.add_argument("--repeat", type=int, default=10, help="timings per measurement (the median is reported)")
    ap.add_argument("--settings", default="", help="more triton columns with dig.ops.dwconv_triton's settings "
                    "replaced, ';'-separated sets, e.g. 'BWD_TILE=2048,BWD_WARPS=8;PROGRAMS_PER_SM=8'")
    ap.add_argument("--out", default=os.environ.get("OUT", ""))
    args = ap.parse_args(argv)
    extra = parse_settings(args.settings)
    if not args.quick and not torch.cuda.is_available():
        ap.error("needs a CUDA GPU (the Triton kernels); --quick runs the cuDNN column's plumbing on the CPU")
    device = torch.device("cpu" if args.quick else "cuda")
    cases = QUICK_CASES if args.quick else GPU_CASES
    if args.resolutions:
        keep = {int(r) for r in args.resolutions.split(",")}
        cases = [c for c in cases if c[0] in keep]
    inner, repeat = (2, 2) if args.quick else (args.inner, args.repeat)
    rows = []
    for res, batch in cases:
        row = bench_case(res, batch, device, args.bandwidth, inner, repeat, extra)
        rows.append(row)
        print(json.dumps(row), flush=True)
    names = list(_variants(device, extra))
    tables = []
    for d, title in (("fwd", "forward"), ("fwd_bwd", "forward + backward")):
        columns = ["res", "batch", "shape", f"floor_{d}_ms"]
        for n in names:
            columns += [f"{n}_{d}_kernel_ms", f"{n}_{d}_floor_x"] + ([f"{n}_{d}_vs_cudnn"] if n.startswith("triton")
                                                                      else [])
        tables.append(f"depthwise conv 3x3 {title}, GPU kernel time per call ({'bf16' if device.type == 'cuda' else 'fp32'}, "
                      f"C {C}); floor at {args.bandwidth / 1e12:.2f} TB/s\n" + fmt_table(rows, columns))
        tables.append(f"depthwise conv 3x3 {title}, wall time per call (host launches included)\n"
                      + fmt_table(rows, ["res", "batch"] + [f"{n}_{d}_ms" for n in names]))
    tables.append("Max |y - float64| (forward)\n" + fmt_table(rows, ["res", "batch"] + [f"{n}_max_err" for n in names]))
    finish_report(tables, rows, args.out, "dwconv",
                  {"versions": versions(), "bandwidth": args.bandwidth, "command": command_line("bench.bench_dwconv",
                                                                                                argv)})


if __name__ == "__main__":
    main()
