"""How each fused GLA kernel's time grows with its number of programs at DiG-XL/2's heads (18 heads, K 32, V 64,
bf16): one program per (image, head), so the batch sets the programs, and the registers a program takes set how
many an SM holds at once. When the programs outnumber the SMs' slots, the rest run in another round ("wave") of
whole programs; each program walks the whole sequence, so a second round costs about a first round's time however
few programs it has. This prints, per kernel and batch, the kernel's device time (torch.profiler, the median over
calls), its registers, the programs per SM and the slots one round has, so that a step in time where the programs
pass the slots shows.

    python3 -m bench.gla_waves                                  # 256 px: 24 ... 36 images
    python3 -m bench.gla_waves --res 512 --batches 28,29,30,32 --configs auto,w4
"""
from __future__ import annotations

import argparse
import importlib
import json
import os

import torch
import torch.nn.functional as F

from .common import command_line, fmt_table, median, versions
from .tune_gla_launch import HEADS, K, V, _binaries, _usage, _warm_clocks, parse_config

KERNELS = {"fwd": "fwd_kernel", "bwd_dq": "bwd_dq_kernel", "bwd_dkv": "bwd_dkv_kernel"}
REGISTERS_PER_PARTITION = 16384  # an SM has four
MAX_WARPS_PER_SM = 64
MAX_BLOCKS_PER_SM = 32


def resident_programs(registers: int | None, warps: int) -> int | None:
    """Programs of `warps` warps one SM holds at once by registers alone. An SM's 65,536 registers are four
    sub-partitions' 16,384, and each warp takes its registers (allocated in units of 256) from one of them: at 200
    registers per thread a partition holds two warps, as at 255, so an SM holds four 2-warp programs either way (the
    measured rounds agree; a count over the whole register file would say five)."""
    if not registers:
        return None
    per_warp = -(-registers * 32 // 256) * 256
    return min(min(4 * (REGISTERS_PER_PARTITION // per_warp), MAX_WARPS_PER_SM) // warps, MAX_BLOCKS_PER_SM)


def prefer_shared_memory(percent: int) -> None:
    """Ask the driver for `percent` of each SM's unified L1/shared memory as shared memory for every Triton kernel
    loaded from now on (CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT, set when Triton loads the binary)."""
    import ctypes

    import triton

    libcuda = ctypes.CDLL("libcuda.so.1")

    def hook(module, function, name, metadata_group, hash):
        status = libcuda.cuFuncSetAttribute(ctypes.c_void_p(function), 9, ctypes.c_int(percent))
        if status != 0:
            raise RuntimeError(f"cuFuncSetAttribute(carveout) failed for {name}: CUresult {status}")

    triton.knobs.runtime.kernel_load_end_hook.add(hook)


def kernel_times_us(fn, names: list[str], calls: int) -> dict[str, float]:
    """Median device time per call of each named kernel over `calls` calls of fn."""
    from torch.profiler import ProfilerActivity, profile

    per_call: dict[str, list[float]] = {n: [] for n in names}
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    for event in prof.events():
        for n in names:
            if event.name == n and event.device_type == torch.autograd.DeviceType.CUDA:
                per_call[n].append(event.device_time)
    return {n: median(v) if v else float("nan") for n, v in per_call.items()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--res", type=int, default=256)
    ap.add_argument("--batches", default="24,28,29,30,32,36")
    ap.add_argument("--configs", default="auto", help="bench.tune_gla_launch option sets, applied to every kernel")
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--carveout", type=int, default=None,
                    help="percent of L1/shared as shared memory for every kernel (default: the driver's choice)")
    ap.add_argument("--out", default=os.environ.get("OUT", ""))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench.gla_waves times Triton kernels and needs a CUDA GPU")
    if args.carveout is not None:
        prefer_shared_memory(args.carveout)
    mod = importlib.import_module("dig.ops.gla_triton")
    kern = importlib.import_module("dig.ops.gla_triton_kernels")
    device = torch.device("cuda")
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    tokens = (args.res // 16) ** 2
    _warm_clocks(device)
    rows = []
    usage = {}  # (kernel, its launch options) -> (registers, spills, shared): one binary per key at one resolution
    for config in args.configs.split(","):
        options = parse_config(config)
        for batch in (int(b) for b in args.batches.split(",")):
            gen = torch.Generator(device=device).manual_seed(0)
            q, k, do = (torch.randn(batch, tokens, HEADS, d, device=device, dtype=torch.bfloat16, generator=gen)
                        for d in (K, K, V))
            v = torch.randn(batch, tokens, HEADS, V, device=device, dtype=torch.bfloat16, generator=gen)
            g = (F.logsigmoid(torch.randn(batch, tokens, HEADS, K, device=device, generator=gen)) / 16).bfloat16()
            scale = K ** -0.5
            saved = dict(mod.LAUNCH_OVERRIDE)
            if options is not None:
                mod.LAUNCH_OVERRIDE.update({name: options for name in KERNELS})
            try:
                def both():
                    mod._forward(q, k, v, g, scale, None, False, 1, None)
                    mod._backward(q, k, v, g, None, scale, do, None, False, 1, None)

                before = {name: {id(b) for b in _binaries(getattr(kern, fn))} for name, fn in KERNELS.items()}
                both()
                torch.cuda.synchronize()
                # the batch picks the launch (LAUNCH_BUSY), not the binary alone
                options_of = {name: mod._options(name, q, batch * HEADS) for name in KERNELS}
                launched = {name: (name, repr(sorted(o.items()))) for name, o in options_of.items()}
                for name, fn in KERNELS.items():
                    new = [b for b in _binaries(getattr(kern, fn)) if id(b) not in before[name]]
                    if new:
                        usage[launched[name]] = (*_usage(new[-1]), new[-1].metadata.shared)
                times = kernel_times_us(both, list(KERNELS.values()), args.calls)
                for name, fn in KERNELS.items():
                    warps = options_of[name]["num_warps"]
                    regs, spills, shared = usage.get(launched[name], (None, None, None))
                    per_sm = resident_programs(regs, warps)
                    row = {"config": config, "res": args.res, "batch": batch, "programs": batch * HEADS,
                           "kernel": name, "warps": warps, "regs": regs, "spills": spills, "shared": shared,
                           "carveout": args.carveout, "per_sm": per_sm,
                           "slots": per_sm * sms if per_sm else None,
                           "rounds": -(-batch * HEADS // (per_sm * sms)) if per_sm else None, "us": times[fn]}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
            finally:
                mod.LAUNCH_OVERRIDE.clear()
                mod.LAUNCH_OVERRIDE.update(saved)
    for r in rows:  # time per image, relative to the smallest batch of the same kernel and config
        first = next(x for x in rows if x["kernel"] == r["kernel"] and x["config"] == r["config"])
        r["us_per_image_vs_first"] = (r["us"] / r["batch"]) / (first["us"] / first["batch"])
    text = fmt_table(rows, ["config", "res", "batch", "programs", "kernel", "warps", "regs", "spills", "shared",
                            "carveout", "per_sm",
                            "slots", "rounds", "us", "us_per_image_vs_first"])
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "gla_waves.json"), "w") as f:
            json.dump({"versions": versions(), "sms": sms, "rows": rows,
                       "command": command_line("bench.gla_waves", argv)}, f, indent=1)
        with open(os.path.join(args.out, "gla_waves.md"), "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
