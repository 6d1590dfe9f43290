"""A real local Ray head for tests: every listener on 127.0.0.1, started as a child process group and stopped by
signalling that group (never `ray stop`, which would also stop other people's Ray on this machine)."""
from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass

from servers import LOOPBACK, free_port, stop_process, wait_http


@dataclass
class RayCluster:
    gcs_address: str     # what drivers pass as RAY_ADDRESS / ray.init(address=...)
    dashboard_url: str   # what `ray job submit --address` takes
    temp_dir: str
    pid: int             # the `ray start --block` process; its process group holds the whole cluster
    auth_env: dict       # token authentication settings every client of this cluster needs

    def env(self) -> dict[str, str]:
        """Environment for a driver that joins this cluster directly (as `python -m data_pipeline` does)."""
        return {"RAY_ADDRESS": self.gcs_address, **self.auth_env}


def ray_environment(auth_env: dict) -> dict[str, str]:
    env = dict(os.environ)
    env.update(auth_env)
    venv_bin = os.path.dirname(sys.executable)
    env.update({
        # Job entrypoints say `python`: make it this interpreter (the venv), as a user's activated venv would.
        "PATH": venv_bin + os.pathsep + env.get("PATH", ""),
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
    })
    env.pop("RAY_ADDRESS", None)
    return env


@contextmanager
def local_ray_cluster(num_cpus: int = 2, object_store_mb: int = 300, log_path: str | None = None):
    # Unix socket paths live under the temp dir and must stay short (108 bytes), hence /tmp/rayXXXX.
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    # Token authentication with a token of our own: independent of ~/.ray/auth_token (which makes Ray turn
    # token auth on by itself when present) and of other people's clusters on this machine.
    token_path = os.path.join(temp_dir, "auth_token")
    with open(token_path, "w") as f:
        f.write(secrets.token_hex(32))
    auth_env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": token_path,
                "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    port, dashboard_port = free_port(), free_port()
    ports = {flag: free_port() for flag in (
        "--node-manager-port", "--object-manager-port", "--metrics-export-port", "--dashboard-agent-listen-port",
        "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--ray-client-server-port")}
    cmd = [os.path.join(os.path.dirname(sys.executable), "ray"), "start", "--head", "--block",
           f"--node-ip-address={LOOPBACK}", f"--port={port}", f"--dashboard-host={LOOPBACK}",
           f"--dashboard-port={dashboard_port}", f"--num-cpus={num_cpus}", "--num-gpus=0",
           f"--object-store-memory={object_store_mb * 2**20}", "--disable-usage-stats", f"--temp-dir={temp_dir}"]
    cmd += [f"{flag}={p}" for flag, p in ports.items()]
    log = open(log_path or os.devnull, "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=ray_environment(auth_env),
                            start_new_session=True)
    try:
        dashboard_url = f"http://{LOOPBACK}:{dashboard_port}"
        wait_http(dashboard_url + "/api/version", timeout=120, proc=proc)
        # job submissions wait only 10 s for the node's dashboard agent, which starts after the dashboard
        # (launch/local_ray.py says more)
        wait_http(f"http://{LOOPBACK}:{ports['--dashboard-agent-listen-port']}/", timeout=120, proc=proc)
        yield RayCluster(gcs_address=f"{LOOPBACK}:{port}", dashboard_url=dashboard_url, temp_dir=temp_dir,
                         pid=proc.pid, auth_env=auth_env)
    finally:
        stop_process(proc, timeout=10)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def processes_in_group(pgid: int) -> list[str]:
    """`ps` lines of every process still in process group `pgid` (empty once the cluster is fully gone)."""
    out = subprocess.run(["ps", "-eo", "pid=,pgid=,args="], capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if line.split(None, 2)[1] == str(pgid)]


def tcp_listeners(pids: set[int]) -> list[tuple[str, int]]:
    """(local address, pid) of every TCP listening socket owned by one of `pids` (from `ss -ltnpH`)."""
    import re

    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    found = []
    for line in out.splitlines():
        fields = line.split()
        for pid in map(int, re.findall(r"pid=(\d+)", line)):
            if pid in pids:
                found.append((fields[3], pid))
    return found
