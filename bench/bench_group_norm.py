"""GroupNorm + SiLU at the SD VAE encoder's shapes (256 px, 64 images + mirrors = 128 rows, channels-last bf16):
our kernels (dig/ops/group_norm_triton.py) under launch options, against torch's eager GroupNorm + SiLU and
inductor's fusion of the same, and against the bytes the op must move (x read twice, y written once) at the
device's measured copy rate. One process, one table; `--options` lists launch option sets to time side by side.

    python3 -m bench.bench_group_norm --options TILE=4096,TILE=2048,STATS_PROGRAMS=4096,NUM_WARPS=8

An option set is NAME=VALUE[;NAME=VALUE...] over the module's TILE, STATS_PROGRAMS and NUM_WARPS; "default" is
the module's own. Writes --out/group_norm_bench.json when given.
"""
from __future__ import annotations

import argparse
import json
import os

import torch
import torch.nn.functional as F

from .common import copy_bandwidth_gbs, fmt_table, median, time_ms, versions

SHAPES = [(128, 128, 256, 256), (128, 128, 128, 128), (128, 256, 128, 128), (128, 256, 64, 64), (128, 512, 64, 64),
          (128, 512, 32, 32)]  # the SD encoder's six norm shapes (22 norms: 4, 1, 3, 1, 3 and 10 of them)
TUNABLE = ("TILE", "STATS_PROGRAMS", "NUM_WARPS")


def parse_options(spec: str) -> dict[str, int]:
    if spec == "default":
        return {}
    options = {}
    for item in spec.split(";"):
        name, sep, value = item.partition("=")
        if not sep or name not in TUNABLE or not value.isdigit() or int(value) < 1:
            raise ValueError(f"bad option set {spec!r}: expected NAME=VALUE[;NAME=VALUE] with NAME in {TUNABLE}")
        options[name] = int(value)
    return options


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--options", default="default", help="comma-separated option sets (see above)")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    try:
        option_sets = [(spec, parse_options(spec)) for spec in args.options.split(",")]
    except ValueError as exc:
        parser.error(str(exc))
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    import dig.ops.group_norm_triton as gn

    device = torch.device("cuda")
    copy_gbs = copy_bandwidth_gbs(device)
    defaults = {name: getattr(gn, name) for name in TUNABLE}
    compiled = torch.compile(lambda x, w, b: F.silu(F.group_norm(x, 32, w, b, 1e-6)), dynamic=False)
    rows = []
    for shape in SHAPES:
        x = torch.randn(shape, device=device, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
        w = torch.randn(shape[1], device=device, dtype=torch.bfloat16)
        b = torch.randn(shape[1], device=device, dtype=torch.bfloat16)
        floor_ms = 3 * x.numel() * x.element_size() / (copy_gbs * 1e9) * 1e3
        row = {"shape": "x".join(map(str, shape)), "floor_ms": floor_ms}
        with torch.no_grad():
            reference = F.silu(F.group_norm(x.float(), 32, w.float(), b.float(), 1e-6))
            row["torch_ms"] = median(time_ms(lambda: F.silu(F.group_norm(x, 32, w, b, 1e-6)), device,
                                             repeat=args.repeat))
            row["inductor_ms"] = median(time_ms(lambda: compiled(x, w, b), device, repeat=args.repeat))
            for spec, options in option_sets:
                for name, value in {**defaults, **options}.items():
                    setattr(gn, name, value)
                y = gn.group_norm_silu(x, 32, w, b, 1e-6, True)
                row[f"ours[{spec}]_maxdiff"] = (y.float() - reference).abs().max().item()
                row[f"ours[{spec}]_ms"] = median(time_ms(lambda: gn.group_norm_silu(x, 32, w, b, 1e-6, True),
                                                         device, repeat=args.repeat))
                row[f"ours[{spec}]_x_floor"] = row[f"ours[{spec}]_ms"] / floor_ms
            for name, value in defaults.items():
                setattr(gn, name, value)
        rows.append(row)
        print(json.dumps(row), flush=True)
    columns = ["shape", "floor_ms", "torch_ms", "inductor_ms"]
    columns += [f"ours[{spec}]_{k}" for spec, _ in option_sets for k in ("ms", "x_floor")]
    print(f"\nGroupNorm + SiLU, bf16 channels-last, ms (copy {copy_gbs:.0f} GB/s; floor: x read twice, y written "
          f"once)\n" + fmt_table(rows, columns))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "group_norm_bench.json"), "w") as f:
            json.dump({"env": versions(), "copy_gbs": copy_gbs, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
