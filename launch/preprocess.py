"""Submit the latent preprocessing job (`python -m data_pipeline …`) to a Ray cluster.

With RAY_ADDRESS (the cluster's dashboard/job address, e.g. http://head:8265) the job goes there through
`ray job submit`, with this checkout (not the current directory) as its working dir and the forwarded
environment (AWS_*, HF_*, MLFLOW_*, …; launch/env.py) in its runtime_env. Without RAY_ADDRESS a Ray head is
started on 127.0.0.1 here, the job is submitted to it the same way, and the head is stopped (by its PID) when
the job ends.

    python -m launch.preprocess --input s3://bucket/imagenet/train --output s3://bucket/latents/in1k-256 \\
        --config configs/preprocess/<x>.yaml [--dry-run] [-- --resolution 512 ...]
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from typing import Mapping, Sequence

from dig.lifeline import child_dies_with_us
from launch.env import describe, forwarded_env

# The code the job runs: this checkout (data_pipeline/ and dig/), whatever the caller's current directory.
CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Paths under the working dir that never need to travel with the job (.gitignore'd paths are skipped by Ray).
WORKING_DIR_EXCLUDES = [".git", "tests", "bench", "*.ckpt", "*.pt"]


class SubmitError(ValueError):
    """Settings that cannot submit a job; the message says which and what to set."""


@dataclass
class JobPlan:
    address: str | None        # None: a local loopback head is started for the job
    entrypoint: list[str]
    runtime_env: dict


def _is_uri(path: str) -> bool:
    return "://" in path


def normalize_address(raw: str) -> str:
    address = raw.strip().rstrip("/")
    if address.startswith("ray://"):
        raise SubmitError(f"RAY_ADDRESS={raw!r} is a Ray Client address; `ray job submit` needs the job "
                          "(dashboard) address of the head, e.g. http://head-node:8265")
    if address in ("auto", "local"):
        raise SubmitError(f"RAY_ADDRESS={raw!r}: give the head's job address (http://head-node:8265), or "
                          "unset RAY_ADDRESS to run on a local Ray started for this job")
    if "://" not in address:
        address = "http://" + address
    if not address.startswith(("http://", "https://")):
        raise SubmitError(f"RAY_ADDRESS={raw!r}: expected http(s)://host:port of the Ray dashboard")
    return address


def plan_job(pipeline_args: Sequence[str], input_uri: str | None = None, output_uri: str | None = None,
             config: str | None = None, environ: Mapping[str, str] | None = None,
             python: str | None = None) -> JobPlan:
    environ = dict(os.environ if environ is None else environ)
    raw_address = environ.get("RAY_ADDRESS", "").strip()
    address = normalize_address(raw_address) if raw_address else None
    if config and not os.path.isfile(config):
        raise SubmitError(f"preprocess config not found: {config!r} (CONFIG)")

    args: list[str] = []
    # The job runs in an unpacked copy of the working dir, so local data paths must be absolute, and on a
    # remote cluster they must exist there (a shared filesystem); s3:// works everywhere.
    for flag, value in (("--input", input_uri), ("--output", output_uri)):
        if value:
            if not _is_uri(value):
                if address:
                    print(f"[preprocess] warning: {flag} {value} is a local path; the cluster at {address} "
                          "must see it at the same path (use s3:// otherwise)", file=sys.stderr)
                value = os.path.abspath(value)
            args += [flag, value]
    if config:
        # Inside the checkout the job finds the file in its copy of the working dir; elsewhere by absolute path.
        config = os.path.abspath(config)
        inside = os.path.commonpath([config, CHECKOUT]) == CHECKOUT
        args += ["--config", os.path.relpath(config, CHECKOUT) if inside else config]
    args += list(pipeline_args)
    if not any(a == "--input" or a.startswith("--input=") for a in args) and not config:
        raise SubmitError("nothing to preprocess: give INPUT=… and OUTPUT=… (or a CONFIG that sets them)")

    # Locally the job uses this interpreter; a cluster's nodes have their own (DIG_RAY_PYTHON overrides).
    job_python = environ.get("DIG_RAY_PYTHON") or ("python" if address else (python or sys.executable))
    runtime_env = {"working_dir": CHECKOUT, "excludes": WORKING_DIR_EXCLUDES, "env_vars": forwarded_env(environ)}
    return JobPlan(address=address, entrypoint=[job_python, "-m", "data_pipeline", *args],
                   runtime_env=runtime_env)


def submit_command(plan: JobPlan, address: str, python: str | None = None) -> list[str]:
    runtime_env = {k: v for k, v in plan.runtime_env.items() if k != "working_dir"}
    return [python or sys.executable, "-m", "ray.scripts.scripts", "job", "submit", "--address", address,
            "--runtime-env-json", json.dumps(runtime_env), "--working-dir", plan.runtime_env["working_dir"],
            "--", *plan.entrypoint]


def run(plan: JobPlan, num_cpus: int | None = None, object_store_mb: int | None = None) -> int:
    if plan.address:
        print(f"[preprocess] submitting to {plan.address}", file=sys.stderr, flush=True)
        return subprocess.call(submit_command(plan, plan.address))
    from launch.local_ray import local_ray_head

    with local_ray_head(num_cpus=num_cpus, object_store_mb=object_store_mb) as head:
        print(f"[preprocess] submitting to the local Ray head at {head.dashboard_url}", file=sys.stderr,
              flush=True)
        # The submitting client dies with us too (the head and its job are stopped by local_ray_head's watchdog).
        return subprocess.call(submit_command(plan, head.dashboard_url), env=head.client_env(),
                               preexec_fn=child_dies_with_us())


def format_plan(plan: JobPlan) -> str:
    where = plan.address or "a local Ray head on 127.0.0.1 (started for this job, stopped after)"
    lines = [f"# Ray job on {where}", f"# runtime_env env_vars: {describe(plan.runtime_env['env_vars'])}"]
    masked = {**plan.runtime_env, "env_vars": {k: "***" for k in plan.runtime_env["env_vars"]}}
    lines.append(shlex.join(submit_command(JobPlan(plan.address, plan.entrypoint, masked),
                                           plan.address or "http://127.0.0.1:<local>")))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.preprocess", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", help="images: ImageFolder tree or webdataset tars, local or s3:// (INPUT)")
    parser.add_argument("--output", help="shard folder, local or s3:// (OUTPUT)")
    parser.add_argument("--config", help="configs/preprocess/*.yaml (CONFIG)")
    parser.add_argument("--num-cpus", type=int, help="CPUs of the local Ray head (default: all)")
    parser.add_argument("--object-store-mb", type=int, help="object store of the local Ray head")
    parser.add_argument("--dry-run", action="store_true", help="print the submission, start nothing")
    parser.add_argument("pipeline_args", nargs="*", help="more `python -m data_pipeline` flags (after --)")
    args = parser.parse_args(argv)
    try:
        plan = plan_job(args.pipeline_args, args.input, args.output, args.config)
    except SubmitError as exc:
        print(f"preprocess: error: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(format_plan(plan))
        return 0
    return run(plan, args.num_cpus, args.object_store_mb)


if __name__ == "__main__":
    sys.exit(main())
