"""One command for the GPU benchmarks, side by side in one process:

    python3 -m bench.run_all --out DIR            # on the GPU machine (H200): DiG-XL/2 vs DiT-XL/2
    python3 -m bench.run_all --quick              # CPU dry run at tiny sizes (checks the plumbing only)

Sections: device ceilings (bf16 matmul, copy bandwidth), GLA vs SDPA op, training step per model, resolution
and variant (eager / regional compile / regional compile with CUDA graphs), DiG/DiT ratios, saved-activation
breakdown of one block. Prints markdown tables (last) and writes results.json + tables.md under --out."""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from .bench_gla import bench_gla_vs_sdpa
from .bench_model import bench_train_step, check_variant
from .common import command_line, copy_bandwidth_gbs, fmt_table, matmul_peak_tflops, model_options, versions
from .memory_breakdown import breakdown

# (image resolution, batch, activation checkpointing): about 32k tokens per step up to 2048 px.
GPU_CASES = [(256, 128, False), (512, 32, False), (1024, 8, False), (2048, 2, False), (4096, 1, True)]
GPU_MODELS = ("DiG-XL/2", "DiT-XL/2")
QUICK_CASES = [(64, 2, False), (128, 1, True)]
QUICK_MODELS = ("DiG-S/2", "DiT-S/2")


def warmup_steps(variant: str, res: int, quick: bool) -> int:
    """Untimed steps before timing: CUDA graphs record on the second call and replay from the third."""
    if variant == "graphs" and not quick:
        return 3
    return 1 if quick or res >= 4096 else 2


def parse_case(text: str) -> tuple[int, int, bool]:
    """RESxBATCH[+ckpt] -> (resolution, batch, activation checkpointing)."""
    body, _, flag = text.partition("+")
    try:
        res, batch = (int(v) for v in body.split("x"))
    except ValueError:
        raise SystemExit(f"--cases: {text!r} is not RESxBATCH[+ckpt], e.g. 256x32") from None
    if flag not in ("", "ckpt"):
        raise SystemExit(f"--cases: unknown flag {flag!r} in {text!r} (only +ckpt)")
    return res, batch, flag == "ckpt"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny CPU dry run")
    ap.add_argument("--sections", default="ceilings,gla,model,memory")
    ap.add_argument("--variants", default="eager,compile",
                    help="comma list of eager, compile (regional), graphs (regional + CUDA graphs, as recipes train)")
    ap.add_argument("--resolutions", default="", help="comma list to restrict the model cases, e.g. 256,2048")
    ap.add_argument("--cases", default="", help="comma list of RESxBATCH[+ckpt] replacing the model cases, e.g. "
                    "256x32,256x128,512x32,1024x8 (the paper's 32 images per GPU beside the default ~32k tokens)")
    ap.add_argument("--budget-s", type=float, default=float("inf"),
                    help="start no new model case after this many seconds (the rest are listed as skipped)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--gla-backends", default="fla,triton",
                    help="GLA backends: compared side by side in the gla section; each one is a DiG row in the "
                         "model section (DiT runs once). BACKEND+scan: a DiG row with model.scan_in_kernel "
                         "(no reorienting copies between blocks; the gla section skips it); BACKEND+KEY=VALUE: a "
                         "DiG row with that model override, e.g. triton+mlp_recompute=false")
    ap.add_argument("--out", default=os.environ.get("OUT", ""))
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    for variant in args.variants.split(","):
        try:
            check_variant(variant)
        except ValueError as e:
            raise SystemExit(f"--variants: {e}") from None

    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    torch._dynamo.config.cache_size_limit = 64
    torch._dynamo.config.accumulated_cache_size_limit = 512
    sections = set(args.sections.split(","))
    gla_backends = tuple(args.gla_backends.split(","))
    if device.type != "cuda":
        gla_backends = tuple(b for b in gla_backends if b.startswith("torch")) or ("torch",)
    kernel_backends = tuple(dict.fromkeys(b.split("+")[0] for b in gla_backends))
    cases = QUICK_CASES if args.quick else GPU_CASES
    if args.cases:
        cases = [parse_case(c) for c in args.cases.split(",")]
    if args.resolutions:
        keep = {int(r) for r in args.resolutions.split(",")}
        cases = [c for c in cases if c[0] in keep]
    models = QUICK_MODELS if args.quick else GPU_MODELS
    results: dict = {"versions": versions(), "command": command_line("bench.run_all", argv)}
    tables: list[str] = []

    def log(msg):
        print(f"[{time.perf_counter() - t_start:7.1f}s] {msg}", flush=True)

    peak = copy_gbs = None
    if "ceilings" in sections:
        if args.quick:
            peak, copy_gbs = matmul_peak_tflops(device, n=256, repeat=2), copy_bandwidth_gbs(device, 1 << 24, 2)
        else:
            peak, copy_gbs = matmul_peak_tflops(device), copy_bandwidth_gbs(device)
        results["ceilings"] = {"bf16_matmul_tflops": peak, "copy_gbs": copy_gbs}
        log(f"ceilings: bf16 matmul {peak:.0f} TFLOP/s, copy {copy_gbs:.0f} GB/s")
        tables.append(f"Ceilings: bf16 matmul (8192^3) {peak:.0f} TFLOP/s; device copy {copy_gbs:.0f} GB/s "
                      "(read + write)")

    if "gla" in sections:
        rows = []
        for res, batch, _ in cases:
            tokens = (res // 16) ** 2
            try:
                row = bench_gla_vs_sdpa(batch, tokens, device, copy_gbs=copy_gbs, peak_tflops=peak,
                                        repeat=2 if args.quick else 10, backends=kernel_backends)
            except Exception as e:  # noqa: BLE001  reported in the table
                row = {"batch": batch, "tokens": tokens, "error": f"{type(e).__name__}: {e}"[:160]}
            row["res"] = res
            rows.append(row)
            log(f"gla {row}")
        results["gla"] = rows
        per_backend = [c for b in kernel_backends for c in (f"{b}_ms", f"{b}_over_floor")]
        tables.append("GLA fwd+bwd (18 heads, K 32, V 64) vs SDPA fwd+bwd (16 heads, d 72), bf16; sdpa/gla uses "
                      f"the {kernel_backends[0]} backend\n" + fmt_table(
                          rows, ["res", "batch", "tokens", *per_backend, "gla_floor_ms", "sdpa_ms", "sdpa/gla",
                                 "sdpa_tflops", "error"]))

    if "model" in sections:
        rows = []
        for variant in args.variants.split(","):
            for res, batch, ckpt in cases:
                for name, backend in [(m, b) for m in models for b in (gla_backends if "DiG" in m else ("",))]:
                    if time.perf_counter() - t_start > args.budget_s:
                        rows.append({"model": name, "gla": backend, "res": res, "batch": batch, "variant": variant,
                                     "error": "skipped (time budget)"})
                        continue
                    overrides = model_options(backend, first="gla_backend") if backend else {}
                    row = bench_train_step(name, res, batch, device, variant=variant, checkpointing=ckpt,
                                           warmup=warmup_steps(variant, res, args.quick),
                                           repeat=2 if args.quick else (3 if res >= 4096 else args.repeat),
                                           peak_tflops=peak, **overrides)
                    row["gla"] = backend
                    rows.append(row)
                    log(f"model {row}")
        results["model"] = rows
        tables.append("Training step (fwd + bwd + AdamW; fp32 params, bf16 autocast)\n" + fmt_table(
            rows, ["model", "gla", "res", "batch", "variant", "ms", "img_s", "peak_gib", "tflops", "mfu", "spread",
                   "wall_s", "error"]))
        ratios = []
        by_key = {(r["model"], r["gla"], r["res"], r["batch"], r["variant"]): r for r in rows}
        for (name, backend, res, batch, variant), r in by_key.items():
            if not name.startswith("DiG"):
                continue
            other = by_key.get((models[1], "", res, batch, variant))
            if other and "img_s" in r and "img_s" in other:
                ratio = {"res": res, "batch": batch, "variant": variant, "gla": backend,
                         "DiG/DiT img/s": r["img_s"] / other["img_s"]}
                if "peak_gib" in r and "peak_gib" in other:
                    ratio["DiG/DiT peak mem"] = r["peak_gib"] / other["peak_gib"]
                ratios.append(ratio)
        results["ratios"] = ratios
        tables.append(f"{models[0]} vs {models[1]}\n" + fmt_table(
            ratios, ["res", "batch", "variant", "gla", "DiG/DiT img/s", "DiG/DiT peak mem"]))

    if "memory" in sections:
        res, batch = (64, 2) if args.quick else (512, 8)
        br = {}
        for name in models:
            try:
                br[name] = breakdown(name, res, batch, device)
            except Exception as e:  # noqa: BLE001  reported, the other sections still print
                log(f"memory breakdown {name}: {type(e).__name__}: {e}")
                br[name] = {}
        results["memory"] = br
        keys = sorted({k for b in br.values() for k in b}, key=lambda k: -max(b.get(k, 0) for b in br.values()))
        rows = [{"module": k, **{f"{n} B/token": br[n].get(k) for n in models}} for k in keys]
        tables.append(f"Saved activations of one block, bytes per token (bf16 autocast, {res} px)\n"
                      + fmt_table(rows, ["module"] + [f"{n} B/token" for n in models]))

    log("done")
    text = "\n\n".join(tables)
    print("\n" + json.dumps(results["versions"]) + "\n\n" + text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
        (out / "tables.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
