"""A real `mlflow server` for tests: sqlite backend, proxied file artifacts, 127.0.0.1 only, stopped by PID."""
from __future__ import annotations

import os
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass

import pytest

from servers import LOOPBACK, free_port, stop_process, wait_http


@dataclass
class MlflowServer:
    uri: str
    pid: int


@contextmanager
def mlflow_server(folder: str):
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log = open(os.path.join(folder, "mlflow-server.log"), "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{folder}/mlflow.db",
         "--artifacts-destination", f"{folder}/artifacts", "--host", LOOPBACK, "--port", str(port),
         "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env, cwd=folder)
    try:
        uri = f"http://{LOOPBACK}:{port}"
        wait_http(uri + "/health", timeout=120, proc=proc)
        yield MlflowServer(uri=uri, pid=proc.pid)
    finally:
        stop_process(proc)
        log.close()


@pytest.fixture(scope="module")
def mlflow_tracking_server(tmp_path_factory):
    with mlflow_server(str(tmp_path_factory.mktemp("mlflow"))) as server:
        yield server
