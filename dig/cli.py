"""`dig` console script. Subcommands are a table: add one by writing `_cmd_<name>(args)` and an entry in
`COMMANDS` with a function that declares its arguments."""
from __future__ import annotations

import argparse
import sys


def _args_train(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML in configs/train/")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. optim.lr=2e-4")
    # DeepSpeed's launcher appends --local_rank unless told --no_local_rank; LOCAL_RANK in the environment rules
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


# Exit codes of `dig train` (README "Stopping, resuming and exit codes"); launch/torchrun.py knows them too.
EXIT_USER_ERROR = 2     # configuration, data or resume error: the message says what to change
EXIT_ABORTED = 3        # stopped on purpose by the trainer (e.g. too many non-finite losses in a row)
EXIT_STOPPED = 75       # SIGTERM/SIGINT: a checkpoint was written; run the same command to resume (EX_TEMPFAIL)


def _cmd_train(args) -> int:
    import os
    import signal

    from dig.data.reader import ShardReadError
    from dig.errors import UserError

    rank = int(os.environ.get("RANK", "0") or 0)
    if os.environ.get("TORCHELASTIC_RUN_ID"):
        # torchrun starts its workers in sessions of their own: without this, a SIGKILLed launcher leaves them
        # training (and a restarted run beside them).
        from dig.lifeline import die_with_parent

        agent = os.environ.get("DIG_AGENT_PID")
        die_with_parent(expected_parent=int(agent) if agent else None)

    def interrupt(signum, _frame):   # until the training loop installs its own stop handler
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, interrupt)

    def report(message: str, everywhere: bool = False) -> None:
        # Every rank meets the same configuration/data error: rank 0 speaks for them (a rank-local one speaks too)
        if rank == 0 or everywhere:
            print(f"dig train: {message}" if rank == 0 else f"dig train (rank {rank}): {message}", file=sys.stderr,
                  flush=True)

    from dig.train.config import resolve, validate

    try:
        resolved = resolve(args.config, args.overrides)
        cfg = validate(resolved, source=args.config)
    except UserError as exc:
        report(f"error: {exc}")
        return EXIT_USER_ERROR
    from dig.train.trainer import TrainingAborted, TrainingStopped, train

    try:
        train(cfg, resolved)
    except TrainingStopped as exc:
        report(str(exc))
        return EXIT_STOPPED
    except KeyboardInterrupt:
        report("stopped before the first step; nothing to save")
        return EXIT_STOPPED
    except TrainingAborted as exc:
        report(str(exc))
        return EXIT_ABORTED
    except UserError as exc:
        report(f"error: {exc}", everywhere=isinstance(exc, ShardReadError))
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()   # no barrier: the other ranks may not have met this error
        return EXIT_USER_ERROR
    return 0


def _args_export(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="run directory (its latest checkpoint) or a checkpoint folder")
    p.add_argument("--out", required=True, help="folder for model.safetensors + config.json")
    p.add_argument("--weights", choices=["ema", "raw"], default="ema")


def _cmd_export(args) -> int:
    from dig.train.export import export

    print(export(args.source, args.out, weights=args.weights))
    return 0


def _args_sample(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="exported folder (dig export) or a run directory / checkpoint folder")
    p.add_argument("--out", required=True, help="PNG file for the grid")
    p.add_argument("--labels", default="", help="comma-separated class indices (default: spread over classes)")
    p.add_argument("--num-images", type=int, default=16)
    p.add_argument("--sampling-steps", type=int, default=250)
    p.add_argument("--method", choices=["ddpm", "ddim"], default="ddpm")
    p.add_argument("--cfg-scale", type=float, default=4.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae", default=None, help="VAE spec (default: the one the latents were made with)")
    p.add_argument("--device", default=None)


def _cmd_sample(args) -> int:
    import os
    import tempfile

    import torch

    from dig.data.reader import LatentNormalizer
    from dig.train.export import WEIGHTS_FILE, export, load_exported
    from dig.train.grid import grid_labels, sample_grid
    from dig.vae import load_vae

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    folder = args.model
    # A run directory has a config.json too (the resolved training config): only weights mark an export.
    if not os.path.exists(os.path.join(folder, WEIGHTS_FILE)):
        folder = export(folder, tempfile.mkdtemp(prefix="dig-export-"))
    model, info = load_exported(folder, device=device)
    labels = ([int(x) for x in args.labels.split(",")] if args.labels
              else grid_labels(args.num_images, model.num_classes))
    vae = load_vae(args.vae or info["vae"], device=device)
    image = sample_grid(model, vae, LatentNormalizer.from_dict(info["normalizer"]), labels, info["latent_shape"],
                        args.sampling_steps, args.method, args.cfg_scale, args.seed, device)
    image.save(args.out)
    print(args.out)
    return 0


# `dig bench SUITE …` runs a script of the checkout's bench/ folder (benchmarks are not installed with the
# package); what each measures and the recorded results are in BENCHMARKS.md.
BENCH_SUITES = {
    "gpu": "bench/run_all.py",                           # DiG vs DiT step, GLA op vs SDPA, memory (GPU)
    "trainer-overhead": "bench/bench_trainer_overhead.py",  # full `dig train` step vs the bare model step
    "pipeline": "bench/bench_pipeline.py",               # Ray latent pipeline vs the bare VAE encoder
}


def _args_bench(p: argparse.ArgumentParser) -> None:
    p.add_argument("suite", choices=sorted(BENCH_SUITES), help="which benchmark (see BENCHMARKS.md)")
    p.add_argument("bench_args", nargs=argparse.REMAINDER, help="passed on to the benchmark (try --help)")


def _cmd_bench(args) -> int:
    import os
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = os.path.join(root, BENCH_SUITES[args.suite])
    if not os.path.exists(script):
        print(f"dig bench: {script} not found; benchmarks run from a source checkout (git clone, then "
              "`make install`)", file=sys.stderr)
        return 2
    module = os.path.relpath(script, root)[:-3].replace(os.sep, ".")
    return subprocess.call([sys.executable, "-m", module, *args.bench_args], cwd=root)


COMMANDS = {
    "train": ("train DiG with DeepSpeed (run under torchrun/deepspeed for several processes)", _args_train,
              _cmd_train),
    "export": ("write a checkpoint's consolidated weights as safetensors + config.json", _args_export,
               _cmd_export),
    "sample": ("sample a grid of images from an exported model or a run", _args_sample, _cmd_sample),
    "bench": ("run a benchmark from the checkout's bench/ folder (results: BENCHMARKS.md)", _args_bench,
              _cmd_bench),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dig", description="DiG pretraining system")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_args, run) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_args(p)
        p.set_defaults(run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
