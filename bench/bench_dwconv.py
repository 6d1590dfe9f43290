"""DiG's depthwise 3x3 convolution at DiG-XL/2's shapes (C = 1152): F.conv2d's backward against ours, which computes
the input gradient as a forward convolution of dy with the taps flipped (dig.ops.dwconv):

    python3 -m bench.bench_dwconv --out DIR      # on a GPU: 256 px / 32 images ... 4096 px / 1 image
    python3 -m bench.bench_dwconv --quick        # CPU, a tiny shape (checks the plumbing)

x: [N, H, W, C] channels-last tokens in bf16 (fp32 with --quick), weight [C, 1, 3, 3] in x's dtype (what autocast
hands a convolution), no bias: a compiled DiG block calls the convolution without its bias and adds the bias (and
sums its gradient) inside neighbouring fused kernels, so both columns time what the step runs. Forward, and forward
+ backward, per call (DiG-XL/2 makes one per block, 28 per step):
  - `conv2d`: F.conv2d on the channels-last view, autograd's backward (cuDNN's input-gradient and weight-gradient
    kernels);
  - `flipped`: dig.ops.dwconv.depthwise_conv3x3: the same forward; dx by cuDNN's forward kernel on dy with the taps
    flipped, the weight gradient cuDNN's.
Each in GPU kernel time (torch.profiler over --inner calls: what a CUDA-graphed step pays), with the kernels by
name (`*_kernels` in the JSON rows), and wall time (median of --repeat timings of --inner back-to-back calls, host
launches included). The byte floor over --bandwidth: the forward reads x and writes y, the backward reads x and dy
and writes dx; `*_floor_x` is a kernel time over it."""
from __future__ import annotations

import argparse
import json
import os

import torch

from dig.ops.dwconv import depthwise_conv3x3
from dig.ops.dwconv_torch import depthwise_conv3x3_torch

from .common import command_line, finish_report, fmt_table, time_per_call, versions

C = 1152  # DiG-XL/2's width
GPU_CASES = [(256, 32), (512, 32), (1024, 8), (2048, 2), (4096, 1)]  # (resolution, images per GPU)
QUICK_CASES = [(64, 2)]


def _variants() -> dict:
    """name -> fn(x, weight) -> y."""
    return {"conv2d": lambda x, w: depthwise_conv3x3(x, w, None, flipped_input_grad=False),
            "flipped": lambda x, w: depthwise_conv3x3(x, w, None)}


def kernel_ms_per_call(fn, device: torch.device, inner: int) -> tuple[float | None, list[str]]:
    """GPU time per call of the kernels (and copies) `inner` calls launch, from torch.profiler: what a CUDA-graphed
    training step pays; and the five longest kernels, "name: ms per call" (to tell cuDNN's dx from its weight
    gradient). The wall time per call above also counts the host's launches, which at small shapes (one call of
    ~50 us at 256 px) can exceed the GPU's work."""
    if device.type != "cuda":
        return None, []
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(inner):
            fn()
        torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    longest = sorted(kernels, key=lambda e: -e.device_time_total)[:5]
    return (sum(e.device_time_total for e in kernels) / 1e3 / inner,
            [f"{e.key[:60]}: {e.device_time_total / 1e3 / inner:.4f}" for e in longest])


def bench_case(res: int, batch: int, device: torch.device, bandwidth: float, inner: int, repeat: int) -> dict:
    side = res // 16  # 8x latents, patch 2
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)
    shape = (batch, side, side, C)
    x = torch.randn(shape, device=device, dtype=dtype, generator=gen).requires_grad_()
    weight = (0.3 * torch.randn(C, 1, 3, 3, device=device, generator=gen)).to(dtype).requires_grad_()
    dy = torch.randn(shape, device=device, dtype=dtype, generator=gen)
    floor = {"fwd": 2 * x.nbytes / bandwidth * 1e3, "fwd_bwd": 5 * x.nbytes / bandwidth * 1e3}
    row: dict = {"res": res, "batch": batch, "shape": "x".join(map(str, shape)),
                 **{f"floor_{k}_ms": ms for k, ms in floor.items()}}
    with torch.no_grad():
        expected = depthwise_conv3x3_torch(x.double(), weight.double(), None)
    for name, fn in _variants().items():
        try:
            with torch.no_grad():
                row[f"{name}_max_err"] = (fn(x, weight).double() - expected).abs().max().item()
            calls = {"fwd": lambda: _no_grad(fn, x, weight),
                     "fwd_bwd": lambda: torch.autograd.grad(fn(x, weight), (x, weight), dy)}
            for d, call in calls.items():
                row[f"{name}_{d}_ms"] = time_per_call(call, device, inner, repeat)
                kernel, breakdown = kernel_ms_per_call(call, device, inner)
                row[f"{name}_{d}_kernel_ms"] = kernel
                if breakdown:
                    row[f"{name}_{d}_kernels"] = breakdown
                row[f"{name}_{d}_floor_x"] = (kernel or row[f"{name}_{d}_ms"]) / floor[d]
        except Exception as e:  # noqa: BLE001  reported in the table, the other column still runs
            row[f"{name}_error"] = f"{type(e).__name__}: {e}"[:120]
    for d in ("fwd", "fwd_bwd"):
        base, ours = row.get(f"conv2d_{d}_kernel_ms"), row.get(f"flipped_{d}_kernel_ms")
        if base and ours:
            row[f"conv2d_over_flipped_{d}"] = base / ours
    return row


def _no_grad(fn, *args):
    with torch.no_grad():
        return fn(*args)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CPU, a tiny shape (kernel times need a GPU)")
    ap.add_argument("--resolutions", default="", help="comma list to restrict the cases, e.g. 256,1024")
    ap.add_argument("--bandwidth", type=float, default=3.3e12, help="bytes/s for the byte floor (default 3.3e12)")
    ap.add_argument("--inner", type=int, default=20, help="calls per timing")
    ap.add_argument("--repeat", type=int, default=10, help="timings per measurement (the median is reported)")
    ap.add_argument("--out", default=os.environ.get("OUT", ""))
    args = ap.parse_args(argv)
    if not args.quick and not torch.cuda.is_available():
        ap.error("needs a CUDA GPU (cuDNN's kernels, timed by the profiler); --quick runs the plumbing on the CPU")
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
    names = list(_variants())
    tables = []
    for d, title in (("fwd", "forward"), ("fwd_bwd", "forward + backward")):
        columns = ["res", "batch", "shape", f"floor_{d}_ms"]
        for n in names:
            columns += [f"{n}_{d}_kernel_ms", f"{n}_{d}_floor_x"]
        columns.append(f"conv2d_over_flipped_{d}")
        dtype = "bf16" if device.type == "cuda" else "fp32"
        tables.append(f"depthwise conv 3x3 {title}, GPU kernel time per call ({dtype}, "
                      f"C {C}); floor at {args.bandwidth / 1e12:.2f} TB/s\n" + fmt_table(rows, columns))
        tables.append(f"depthwise conv 3x3 {title}, wall time per call (host launches included)\n"
                      + fmt_table(rows, ["res", "batch"] + [f"{n}_{d}_ms" for n in names]))
    tables.append("Max |y - float64| (forward)\n" + fmt_table(rows, ["res", "batch"] + [f"{n}_max_err" for n in names]))
    finish_report(tables, rows, args.out, "dwconv",
                  {"versions": versions(), "bandwidth": args.bandwidth, "command": command_line("bench.bench_dwconv",
                                                                                                argv)})


if __name__ == "__main__":
    main()
