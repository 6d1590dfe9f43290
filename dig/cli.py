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
_RANK0_REPORT_GRACE_S = 60.0


def _cmd_train(args) -> int:
    import os
    import signal

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

    def user_error(message: str, everywhere: bool = False) -> int:
        report(f"error: {message}", everywhere)
        if rank != 0 and not everywhere and int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
            # Every rank meets this error, but one that leaves first gets rank 0 ended by torchrun before it has
            # said why (it may still be importing): wait until torchrun ends us after rank 0 has exited. Still
            # here after the grace period, rank 0 did not meet it: say it ourselves.
            import time

            try:
                time.sleep(_RANK0_REPORT_GRACE_S)
            except KeyboardInterrupt:
                return EXIT_USER_ERROR
            report(f"error: {message}", everywhere=True)
        return EXIT_USER_ERROR

    try:
        return _train_reporting_errors(args, report, user_error)
    except KeyboardInterrupt:
        report("stopped before the first step; nothing to save")
        return EXIT_STOPPED


def _train_reporting_errors(args, report, user_error) -> int:
    from dig.data.reader import ShardReadError
    from dig.errors import UserError
    from dig.train.config import resolve, validate

    try:
        resolved = resolve(args.config, args.overrides)
        cfg = validate(resolved, source=args.config)
    except UserError as exc:
        return user_error(str(exc))

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
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()   # no barrier: the other ranks may not have met this error
        return user_error(str(exc), everywhere=isinstance(exc, ShardReadError))
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
    p.add_argument("model", help="exported folder (dig export), a run directory (its latest EMA) or a checkpoint")
    p.add_argument("--out", required=True,
                   help="a .png grid, a folder (gets samples.png), or a .npz sample set for `dig eval` (then run "
                        "under torchrun for several processes; an interrupted run resumes)")
    p.add_argument("--labels", default="", help="grid: comma-separated class indices (default: spread over classes)")
    p.add_argument("--num-images", type=int, default=16, help="grid: number of images")
    p.add_argument("--num-samples", type=int, default=50000, help=".npz: number of samples (labels uniform)")
    p.add_argument("--batch-size", type=int, default=32, help=".npz: samples per process per forward")
    p.add_argument("--sampling-steps", type=int, default=250)
    p.add_argument("--method", choices=["ddpm", "ddim"], default="ddpm")
    p.add_argument("--cfg-scale", type=float, default=None,
                   help="classifier-free guidance (default: 4.0 for grids, 1.0 for .npz as the release's FID "
                        "sampler; the paper's guided FID uses 1.5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae", default=None, help="VAE spec (default: the one the latents were made with)")
    p.add_argument("--device", default=None)
    p.add_argument("--no-tf32", dest="tf32", action="store_false", help=".npz on GPU: full fp32 matmuls")


def _cmd_sample(args) -> int:
    import logging
    import os

    if args.out.endswith(".npz"):
        from dig.inference.sample_npz import sample_to_npz

        if args.labels:
            print("dig sample: --labels is for grids; a .npz sample set draws labels uniformly", file=sys.stderr)
            return 2
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        try:
            out = sample_to_npz(args.model, args.out, args.num_samples, batch_size=args.batch_size,
                                num_steps=args.sampling_steps, method=args.method,
                                cfg_scale=1.0 if args.cfg_scale is None else args.cfg_scale, seed=args.seed,
                                vae=args.vae, device=args.device, tf32=args.tf32)
        except (FileExistsError, FileNotFoundError, ValueError) as exc:
            print(f"dig sample: {exc}", file=sys.stderr)
            return 2
        if out:
            print(out)
        return 0

    from dig.inference.grid import grid_labels, sample_grid
    from dig.inference.pipeline import load_pipeline

    out = args.out
    if os.path.isdir(out) or out.endswith(os.sep):
        out = os.path.join(out, "samples.png")
    if os.path.splitext(out)[1].lower() not in (".png", ".jpg", ".jpeg", ".webp"):
        print(f"dig sample: --out {args.out!r}: give a .png (or .jpg/.webp) grid, a folder, or a .npz sample set",
              file=sys.stderr)
        return 2
    try:
        pipe = load_pipeline(args.model, device=args.device, vae=args.vae)
    except FileNotFoundError as exc:
        print(f"dig sample: {exc}", file=sys.stderr)
        return 2
    labels = ([int(x) for x in args.labels.split(",")] if args.labels
              else grid_labels(args.num_images, pipe.model.num_classes))
    image = sample_grid(pipe.model, pipe.vae, pipe.normalizer, labels, pipe.latent_shape, args.sampling_steps,
                        args.method, 4.0 if args.cfg_scale is None else args.cfg_scale, args.seed, pipe.device,
                        progress=sys.stderr.isatty())  # a bar over the denoising steps on a terminal
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    image.save(out)
    print(out)
    return 0


def _args_eval(p: argparse.ArgumentParser) -> None:
    p.add_argument("--samples", required=True, help="sample set .npz (dig sample … --out X.npz): arr_0 uint8 NHWC")
    p.add_argument("--ref", required=True, help="reference batch .npz, e.g. ADM's VIRTUAL_imagenet256_labeled.npz")
    p.add_argument("--inception", default=None,
                   help="pt_inception-2015-12-05-6726825d.pth (README: Evaluation); default $DIG_INCEPTION")
    p.add_argument("--random-inception", action="store_true",
                   help="random Inception weights (tests and smoke runs only: the numbers mean nothing)")
    p.add_argument("--recompute-ref-stats", action="store_true",
                   help="ignore mu/sigma stored in the reference batch; compute them from its images")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--device", default=None)
    p.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    p.add_argument("--mlflow-run", default=None,
                   help="log the numbers to this MLflow run: a run id, or a run directory (its tracking.json)")
    p.add_argument("--step", type=int, default=None, help="MLflow step to log the numbers at (default 0)")


def _cmd_eval(args) -> int:
    import json
    import logging
    import os

    from dig.eval.evaluator import NpzError, evaluate, format_table, log_to_mlflow
    from dig.eval.inception import default_weights

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    weights = args.inception or default_weights()
    if weights is None and not args.random_inception:
        print("dig eval: no Inception weights: pass --inception PATH (or set DIG_INCEPTION); the README's "
              "'Evaluation' section says where to get pt_inception-2015-12-05-6726825d.pth", file=sys.stderr)
        return 2
    run_id = uri = None
    if args.mlflow_run:  # resolve before the long work: a wrong run fails at once
        run_id, uri = args.mlflow_run, None
        state = os.path.join(args.mlflow_run, "tracking.json")
        if os.path.isdir(args.mlflow_run):
            if not os.path.exists(state):
                print(f"dig eval: {args.mlflow_run} has no tracking.json (not a training run directory)",
                      file=sys.stderr)
                return 2
            with open(state) as f:
                saved = json.load(f)
            run_id, uri = saved["run_id"], saved.get("uri")
    try:
        metrics = evaluate(args.samples, args.ref, None if args.random_inception else weights, device=args.device,
                           batch_size=args.batch_size, use_ref_stats=not args.recompute_ref_stats)
    except (FileNotFoundError, NpzError, ValueError) as exc:
        print(f"dig eval: {exc}", file=sys.stderr)
        return 2
    print(format_table(metrics))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(metrics, f, indent=1)
    if run_id:
        log_to_mlflow(metrics, run_id, uri, step=args.step)
        print(f"logged to MLflow run {run_id}")
    return 0


def _args_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("--list", action="store_true", help="every training and preprocessing key with its type, "
                   "default and meaning (Markdown; README.md includes it)")
    p.add_argument("--config", help="a training YAML: print the effective config (every key, defaults filled in)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, as for `dig train`")


def _cmd_config(args) -> int:
    if args.list:
        from dig.config_reference import reference

        print(reference())
        return 0
    if not args.config:
        print("dig config: give --list, or --config FILE [key=value ...]", file=sys.stderr)
        return 2
    import yaml

    from dig.train.config import ConfigError, resolve, validate

    try:
        cfg = validate(resolve(args.config, args.overrides), source=args.config)
    except ConfigError as exc:
        print(f"dig config: {exc}", file=sys.stderr)
        return 2
    print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), end="")
    return 0


# `dig bench SUITE …` runs a script of the checkout's bench/ folder (benchmarks are not installed with the
# package); what each measures and the recorded results are in BENCHMARKS.md.
BENCH_SUITES = {
    "gpu": "bench/run_all.py",                           # DiG vs DiT step, GLA op vs SDPA, memory (GPU)
    "ab-step": "bench/ab_step.py",                       # training steps timed against each other in rounds
    "ab-train": "bench/ab_train.py",                     # `dig train` steps timed against each other in rounds
    "dwconv": "bench/bench_dwconv.py",                   # DiG's depthwise conv: its two backwards, byte floor
    "gla-kernels": "bench/bench_gla_kernels.py",         # GLA kernels fwd / bwd vs fla, SDPA, byte floor
    "train": "bench/bench_train.py",                     # the real `dig train` path (launcher, DeepSpeed, ...)
    "trainer-overhead": "bench/bench_trainer_overhead.py",  # full `dig train` step vs the bare model step
    "pipeline": "bench/bench_pipeline.py",               # Ray latent pipeline vs the bare VAE encoder
    "memory": "bench/bench_memory.py",                   # GPU memory and the largest batch per GPU, per model/res
    "saved-activations": "bench/memory_breakdown.py",    # what the compiled model saves for backward, per token
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
    "sample": ("sample a grid, or a sample set (.npz) for FID, from an exported model or a run", _args_sample,
               _cmd_sample),
    "eval": ("FID, sFID, Inception Score, precision and recall of a sample set against a reference batch",
             _args_eval, _cmd_eval),
    "config": ("list every config key (--list) or print a run's effective config (--config FILE)", _args_config,
               _cmd_config),
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
