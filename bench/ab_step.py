"""Two or more training steps timed against each other in rounds, in one process: for 1-3 % differences.

    python3 -m bench.ab_step --res 1024 --batch 8 --steps "DiG-XL/2,DiG-XL/2+dw_conv_flipped_grad=false"
    python3 -m bench.ab_step --res 256 --batch 32 --steps "DiG-XL/2,DiT-XL/2" --rounds 20
    python3 -m bench.ab_step --quick       # CPU, a tiny DiG against itself with an override (checks the plumbing)

Why. `bench.run_all` times each model's step in a block of its own (two warm-up steps, then five), one model
after the other: between such blocks, and between calls, the same step moved by about 2 % (BENCHMARKS.md), so a
change worth 1-2 % could not be told from the noise. Here every step (bench.bench_model's: fwd + bwd + fused
AdamW, fp32 parameters, bf16 autocast; blocks compiled with CUDA graphs by default, `--variant`) is built and
warmed up first, all of them held at once, and then each round times every step for --steps-per-round steps back
to back (after --settle untimed steps, so that the switch from the other model does not count), in an order that
rotates from round to round. A step's time is the median over rounds; its ratio to the first step is the median
of the per-round ratios, with the spread of those ratios (10th-90th percentile) beside it: the drift of the GPU
and the host over the run cancels within a round.

STEP is a model name with `+KEY=VALUE` model overrides (bench.common.model_options). All steps stay allocated
together: memory is the sum of their peaks (with CUDA graphs, each step's activations stay in the graphs' pool).
Compare steps whose blocks compute differently (another model, or an override the blocks read, which dynamo
guards on): two models with identical blocks would share one compiled graph, and with CUDA graphs its recordings,
across two sets of parameters; that case is not what this measures.
"""
from __future__ import annotations

import argparse

import torch

from .bench_model import VARIANTS, build_step, free
from .common import (add_round_options, check_round_options, command_line, finish_report, fmt_table,
                     labelled_models, paired_ratios, rotating_rounds, time_ms, versions)


def timed_block(step, device: torch.device, settle: int, count: int) -> float:
    """ms per step over `count` steps back to back, after `settle` untimed ones."""
    for _ in range(settle):
        step()
    return time_ms(lambda: [step() for _ in range(count)], device, warmup=0, repeat=1)[0] / count


def summarise(times: dict[str, list[float]], batch: int) -> list[dict]:
    base = next(iter(times))
    stats = paired_ratios(times, base)
    return [{"step": label, "ms": stats[label]["ms"], "min_ms": min(ms), "max_ms": max(ms),
             "img_s": batch / (stats[label]["ms"] * 1e-3), f"ms / {base}": stats[label]["ratio"],
             "p10": stats[label]["p10"], "p90": stats[label]["p90"]} for label, ms in times.items()]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", default="", help="comma list of STEP (MODEL[+KEY=VALUE...]); the first is the base")
    ap.add_argument("--res", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32, help="images per step")
    ap.add_argument("--variant", choices=VARIANTS, default="graphs", help="eager, compile, or graphs (default)")
    add_round_options(ap, warmup=4, rounds=15, what="step")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps = args.steps or "DiG-S/2+depth=2,DiG-S/2+depth=2+mlp_recompute=false"
        args.res, args.batch, args.variant, args.warmup = 64, 2, "eager", 1
        args.rounds = 3 if args.rounds is None else args.rounds
    check_round_options(ap, args, rounds=15)
    if not args.steps:
        ap.error("--steps is required (or --quick)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.variant != "eager" and device.type != "cuda" and not args.quick:
        ap.error("compiled variants need a CUDA GPU here; --variant eager or --quick on the CPU")
    steps, models = {}, []
    for label, name, overrides in labelled_models(args.steps, "--steps", "step"):
        model, step, opt = build_step(name, args.res, args.batch, device, compile_blocks=args.variant != "eager",
                                      cudagraphs=args.variant == "graphs", **overrides)
        for _ in range(args.warmup):
            loss = step()
        if not torch.isfinite(loss):
            raise SystemExit(f"{label}: non-finite loss {loss.item()}")
        steps[label] = step
        models.append((model, opt))
        print(f"built and warmed up {label}", flush=True)
    blocks = {label: (lambda step=step: timed_block(step, device, args.settle, args.steps_per_round))
              for label, step in steps.items()}
    times = rotating_rounds(blocks, args.rounds)
    rows = summarise(times, args.batch)
    base = rows[0]["step"]
    table = (f"{args.res} px, {args.batch} images per step, {args.variant}: {args.rounds} rounds of "
             f"{args.steps_per_round} steps each (after {args.settle} untimed), order rotating; ratio = median of the "
             f"per-round ratios to {base}, p10-p90 their spread\n")
    ratios = (f"ms / {base}", "p10", "p90")  # shown to 4 decimals: the differences measured here are 0.5-3 %
    shown = [{**r, **{k: f"{r[k]:.4f}" for k in ratios}} for r in rows]
    table += fmt_table(shown, ["step", "ms", "min_ms", "max_ms", "img_s", *ratios])
    for row in rows:
        row.update(res=args.res, batch=args.batch)
    finish_report([table], rows, args.out, "ab_step",
                  {"versions": versions(), "command": command_line("bench.ab_step", argv), "times_ms": times,
                   "variant": args.variant})
    del steps, models
    free(device)


if __name__ == "__main__":
    main()
