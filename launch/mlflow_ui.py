"""The MLflow UI over the runs' tracking store, on 127.0.0.1 only.

The store is MLFLOW_TRACKING_URI when it names a database or a folder, else MLflow's local default
`sqlite:///mlflow.db` (what `dig train` and the demo write when no tracking URI is set). If MLFLOW_TRACKING_URI
is already a server (http://…), there is nothing to start: open that address instead.
Reach it from another machine through an ssh tunnel (`ssh -L 5000:127.0.0.1:5000 host`), not by binding wider.

    python -m launch.mlflow_ui [--port 5000] [--dry-run]
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from typing import Mapping, Sequence

LOOPBACK = "127.0.0.1"
DEFAULT_STORE = "sqlite:///mlflow.db"
_SERVER_SCHEMES = ("http://", "https://", "databricks")


class UIError(ValueError):
    pass


def plan_ui(port: int, environ: Mapping[str, str] | None = None,
            python: str | None = None) -> tuple[list[str], dict[str, str]]:
    environ = os.environ if environ is None else environ
    store = environ.get("MLFLOW_TRACKING_URI", "").strip() or DEFAULT_STORE
    if store.startswith(_SERVER_SCHEMES):
        raise UIError(f"MLFLOW_TRACKING_URI={store} is already a tracking server: open it in a browser "
                      "(or unset MLFLOW_TRACKING_URI to browse the local sqlite:///mlflow.db)")
    if not 0 < port < 65536:
        raise UIError(f"MLFLOW_PORT must be a TCP port, got {port}")
    command = [python or sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store,
               "--host", LOOPBACK, "--port", str(port), "--workers", environ.get("MLFLOW_UI_WORKERS", "1")]
    # Without this MLflow 3 starts a pool of job-execution workers (~10 processes) a UI does not need.
    return command, {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.mlflow_ui", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    try:
        command, env = plan_ui(args.port)
    except UIError as exc:
        print(f"mlflow-ui: error: {exc}", file=sys.stderr)
        return 2
    line = " ".join(f"{k}={v}" for k, v in env.items()) + " " + shlex.join(command)
    if args.dry_run:
        print(line)
        return 0
    print(f"[mlflow-ui] {line}\n[mlflow-ui] open http://{LOOPBACK}:{args.port}/#/experiments?workflowType="
          "machine_learning (Ctrl-C stops it)",
          file=sys.stderr, flush=True)
    os.execve(command[0], command, {**os.environ, **env})  # the server replaces us: signals reach it directly


if __name__ == "__main__":
    sys.exit(main())
