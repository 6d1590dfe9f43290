"""Launch `dig train` on one or many nodes: DeepSpeed's launcher with a hostfile, or torchrun per node.

Settings come from the environment (the Makefile passes its variables through):
  HOSTFILE        an MPI-style hostfile (`host slots=N` lines, see launch/hostfile.example): DeepSpeed's launcher
                  starts every node from this one over ssh/pdsh (or DS_LAUNCHER=openmpi|slurm|...)
  NNODES          number of nodes (default 1); with HOSTFILE: use the first NNODES hosts
  NODE_RANK       this node's rank in [0, NNODES) (torchrun mode; required when NNODES > 1)
  MASTER_ADDR     address of node 0 that every node can reach (required when NNODES > 1 without HOSTFILE)
  MASTER_PORT     its rendezvous port (default 29500)
  GPUS_PER_NODE   processes per node (default: every visible GPU; 1 on a machine without GPUs)
Without a GPU the CPU path runs: DS_ACCELERATOR=cpu, gloo collectives, GPUS_PER_NODE processes (default 1).

Every rank gets the forwarded environment (AWS_*, MLFLOW_*, NCCL_*, HF_*, DIG_*, ...; see launch/env.py) with
NVLink multicast off by default. `--dry-run` prints the command instead of running it.

    python -m launch.train --config configs/train/dig_xl2.yaml [--dry-run] [-- key=value ...]
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from launch.env import describe, forwarded_env

DEFAULT_MASTER_PORT = 29500
# `dig train` as a module, so every node runs it with the launcher's interpreter (no PATH assumptions).
TRAIN_MODULE = ("dig.cli", "train")
TORCHRUN_MODULE = "launch.torchrun"
CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_HOSTFILE_LINE = re.compile(r"^(?P<host>\S+)\s+slots=(?P<slots>\d+)$")


class LaunchError(ValueError):
    """Settings that cannot start a run; the message says which and what to set."""


@dataclass
class LaunchPlan:
    mode: str                       # "torchrun" or "deepspeed"
    command: list[str]
    env: dict[str, str]             # added to the launcher's own environment (ranks inherit it)
    summary: str
    remote_env: dict[str, str] = field(default_factory=dict)  # deepspeed: exported on every remote node


def _int_setting(environ: Mapping[str, str], name: str, default: int | None, minimum: int) -> int | None:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise LaunchError(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise LaunchError(f"{name} must be >= {minimum}, got {value}")
    return value


def parse_hostfile(path: str) -> list[tuple[str, int]]:
    """The (host, slots) entries of an MPI-style hostfile, in order; comments (#) and blank lines skipped."""
    if not os.path.isfile(path):
        raise LaunchError(f"hostfile not found: {path!r} (HOSTFILE). Copy launch/hostfile.example and list "
                          "one `hostname slots=GPUS` line per node.")
    hosts: list[tuple[str, int]] = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            m = _HOSTFILE_LINE.match(line)
            if not m:
                raise LaunchError(f"{path}:{lineno}: expected `hostname slots=N`, got {line!r}")
            if int(m["slots"]) < 1:
                raise LaunchError(f"{path}:{lineno}: slots must be >= 1, got {line!r}")
            if any(h == m["host"] for h, _ in hosts):
                raise LaunchError(f"{path}:{lineno}: host {m['host']!r} is listed twice")
            hosts.append((m["host"], int(m["slots"])))
    if not hosts:
        raise LaunchError(f"hostfile {path!r} lists no hosts")
    return hosts


def visible_gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


def _train_args(config: str, overrides: Sequence[str]) -> list[str]:
    return [*TRAIN_MODULE[1:], "--config", config, *overrides]


def plan_launch(config: str, overrides: Sequence[str] = (), environ: Mapping[str, str] | None = None,
                gpu_count: int | None = None, python: str | None = None, dry_run: bool = False) -> LaunchPlan:
    """Check the settings and build the launcher command; raises LaunchError before anything starts. With
    `dry_run` a missing launcher tool (pdsh) is a note in the plan's summary instead, so the command can be
    inspected on a machine that will not run it."""
    environ = dict(os.environ if environ is None else environ)
    python = python or sys.executable
    if not config:
        raise LaunchError("CONFIG is required, e.g. `make launch CONFIG=configs/train/<run>.yaml`")
    if "://" not in config and not os.path.isfile(config):
        raise LaunchError(f"training config not found: {config!r} (CONFIG)")

    hostfile = environ.get("HOSTFILE", "").strip()
    nnodes = _int_setting(environ, "NNODES", None, 1)
    node_rank = _int_setting(environ, "NODE_RANK", None, 0)
    master_addr = environ.get("MASTER_ADDR", "").strip()
    master_port = _int_setting(environ, "MASTER_PORT", DEFAULT_MASTER_PORT, 1)
    if master_port > 65535:
        raise LaunchError(f"MASTER_PORT must be <= 65535, got {master_port}")
    gpus_per_node = _int_setting(environ, "GPUS_PER_NODE", None, 1)

    env = forwarded_env(environ)
    if hostfile:
        return _plan_deepspeed(config, overrides, environ, env, python, hostfile, nnodes, node_rank,
                               master_addr, master_port, gpus_per_node, dry_run)

    nnodes = nnodes or 1
    if nnodes > 1:
        if not master_addr:
            raise LaunchError(f"NNODES={nnodes} needs MASTER_ADDR: the address of node 0 that every node can "
                              "reach (or use a HOSTFILE with DeepSpeed's launcher)")
        if node_rank is None:
            raise LaunchError(f"NNODES={nnodes} needs NODE_RANK on every node (0 on the MASTER_ADDR node, "
                              f"then 1..{nnodes - 1})")
    if node_rank is not None and node_rank >= nnodes:
        raise LaunchError(f"NODE_RANK={node_rank} is out of range for NNODES={nnodes} (0..{nnodes - 1})")

    cpu = environ.get("DS_ACCELERATOR", "").strip().lower() == "cpu"
    if gpu_count is None and not cpu:
        gpu_count = visible_gpu_count()  # imports torch: only once the cheap checks passed
    cpu = cpu or gpu_count == 0
    if cpu:
        env["DS_ACCELERATOR"] = "cpu"
        nproc = gpus_per_node or 1
    else:
        if gpus_per_node and gpus_per_node > gpu_count:
            raise LaunchError(f"GPUS_PER_NODE={gpus_per_node} but only {gpu_count} GPU(s) are visible here")
        nproc = gpus_per_node or gpu_count

    # launch.torchrun = torchrun with clean stops, one-line errors and no orphans (see its docstring)
    command = [python, "-m", TORCHRUN_MODULE, f"--nnodes={nnodes}", f"--nproc-per-node={nproc}"]
    if nnodes == 1 and not master_addr:
        command.append("--standalone")  # free rendezvous port on loopback; several runs can share a machine
    else:
        command += [f"--node-rank={node_rank or 0}", f"--master-addr={master_addr or '127.0.0.1'}",
                    f"--master-port={master_port}"]
    command += ["-m", TRAIN_MODULE[0], *_train_args(config, overrides)]
    where = "CPU (gloo)" if cpu else "GPU"
    summary = (f"torchrun: node {node_rank or 0} of {nnodes}, {nproc} {where} process(es) per node"
               + (f", master {master_addr}:{master_port}" if nnodes > 1 or master_addr else ", standalone"))
    return LaunchPlan(mode="torchrun", command=command, env=env, summary=summary)


def _plan_deepspeed(config, overrides, environ, env, python, hostfile, nnodes, node_rank, master_addr,
                    master_port, gpus_per_node, dry_run: bool = False) -> LaunchPlan:
    hosts = parse_hostfile(hostfile)
    if node_rank is not None:
        raise LaunchError("NODE_RANK is for torchrun mode (one launch per node); with HOSTFILE DeepSpeed "
                          "starts every node from this one. Unset NODE_RANK or HOSTFILE.")
    if nnodes is not None and nnodes > len(hosts):
        raise LaunchError(f"NNODES={nnodes} but hostfile {hostfile!r} lists only {len(hosts)} host(s)")
    used = hosts[:nnodes] if nnodes else hosts
    if gpus_per_node is not None:
        short = [h for h, slots in used if slots < gpus_per_node]
        if short:
            raise LaunchError(f"GPUS_PER_NODE={gpus_per_node} exceeds the slots of {', '.join(short)} "
                              f"in {hostfile!r}")
    launcher = environ.get("DS_LAUNCHER", "pdsh").strip().lower()
    missing = ""
    if len(used) > 1 and launcher == "pdsh" and not shutil.which("pdsh"):
        missing = ("a multi-node HOSTFILE launch uses pdsh (DeepSpeed's default), which is not installed here: "
                   "install pdsh, or set DS_LAUNCHER=openmpi|slurm|mpich|impi|mvapich")
        if not dry_run:
            raise LaunchError(missing)

    command = [python, "-m", "deepspeed.launcher.runner", f"--hostfile={hostfile}"]
    if nnodes is not None:
        command.append(f"--num_nodes={nnodes}")
    if gpus_per_node is not None:
        command.append(f"--num_gpus={gpus_per_node}")
    if master_addr:
        command.append(f"--master_addr={master_addr}")
    command.append(f"--master_port={master_port}")
    if launcher != "pdsh":
        command.append(f"--launcher={launcher}")
    command += ["--no_local_rank", "--module", TRAIN_MODULE[0], *_train_args(config, overrides)]
    slots = [gpus_per_node or s for _, s in used]
    summary = (f"deepspeed ({launcher}): {len(used)} node(s) from {hostfile} "
               f"[{', '.join(h for h, _ in used)}], {sum(slots)} process(es)"
               + (f", master {master_addr}:{master_port}" if master_addr else "")
               + (f"\n# NOTE: {missing}" if missing else ""))
    # DeepSpeed exports only a few prefixes to remote nodes; the rest travels in its DS_ENV_FILE (it quotes
    # values itself).
    return LaunchPlan(mode="deepspeed", command=command, env=env, summary=summary, remote_env=dict(env))


def _write_env_file(variables: Mapping[str, str]) -> str:
    fd, path = tempfile.mkstemp(prefix="dig-launch-env-", text=True)  # 0600: it may hold credentials
    with os.fdopen(fd, "w") as f:
        for k, v in variables.items():
            if "\n" in v:
                print(f"[launch] not forwarding {k}: its value spans lines", file=sys.stderr)
                continue
            f.write(f"{k}={v}\n")
    return path


def run(plan: LaunchPlan) -> int:
    env = {**os.environ, **plan.env}
    env_file = None
    if plan.remote_env:
        env_file = env["DS_ENV_FILE"] = _write_env_file(plan.remote_env)
    print(f"[launch] {plan.summary}", file=sys.stderr, flush=True)
    if plan.mode == "torchrun":
        # Its own session: Ctrl-C reaches only this process, which passes it on once (launch.torchrun hands it to
        # the ranks: checkpoint, one line, exit code 75). It dies with this process, the ranks die with it.
        env["DIG_LAUNCHER_PID"] = str(os.getpid())
        env["PYTHONPATH"] = os.pathsep.join(p for p in (CHECKOUT, env.get("PYTHONPATH", "")) if p)
        proc = subprocess.Popen(plan.command, env=env, start_new_session=True)
    else:
        proc = subprocess.Popen(plan.command, env=env)
    forward = lambda signum, _frame: proc.send_signal(signum)  # noqa: E731
    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        return proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if env_file:
            os.unlink(env_file)


def format_plan(plan: LaunchPlan) -> str:
    lines = [f"# {plan.summary}", f"# environment for every rank: {describe(plan.env)}"]
    if plan.remote_env:
        lines.append(f"# DS_ENV_FILE (written at launch, removed after): {len(plan.remote_env)} variables")
    lines.append(shlex.join(plan.command))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="", help="training config YAML (CONFIG)")
    parser.add_argument("--dry-run", action="store_true", help="print the launcher command, start nothing")
    parser.add_argument("overrides", nargs="*", help="key=value overrides passed to `dig train`")
    args = parser.parse_args(argv)
    try:
        plan = plan_launch(args.config, args.overrides, dry_run=args.dry_run)
    except LaunchError as exc:
        print(f"launch: error: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(format_plan(plan))
        return 0
    return run(plan)


if __name__ == "__main__":
    sys.exit(main())
