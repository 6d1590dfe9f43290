"""Real servers for tests, on loopback only, started as child processes and stopped by PID."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass

from launch.local_ray import free_port  # noqa: F401  (re-exported to the tests' servers)

LOOPBACK = "127.0.0.1"


def wait_http(url: str, timeout: float = 60.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server for {url} exited early with code {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except urllib.error.HTTPError:
            return  # it answered
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"no answer from {url} within {timeout}s")


def stop_process(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    """Stop a server we started: SIGTERM its process group (we start each in its own session), then SIGKILL."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout)


@dataclass
class S3Server:
    endpoint_url: str
    pid: int

    def env(self) -> dict[str, str]:
        """The standard AWS environment that points boto3 (in any process) at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }


@contextmanager
def moto_s3_server(log_path: str | None = None):
    """moto's standalone S3-protocol server over HTTP on 127.0.0.1 (bytes really cross the socket)."""
    port = free_port()
    log = open(log_path or os.devnull, "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", LOOPBACK, "-p", str(port)],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        url = f"http://{LOOPBACK}:{port}"
        wait_http(url + "/moto-api/", proc=proc)
        yield S3Server(endpoint_url=url, pid=proc.pid)
    finally:
        stop_process(proc)
        log.close()
