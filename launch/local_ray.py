"""A Ray head on this machine, bound to loopback, started as a child process and stopped by its PID.

Used when no RAY_ADDRESS is given (`make preprocess`, `make demo`). Every port is chosen free on 127.0.0.1 and
the session lives in its own temp dir, so it coexists with other Ray clusters on the same machine; it is
stopped by signalling its own process group, never with `ray stop` (which would kill every Ray here).
"""
from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """A port on 127.0.0.1 that is free now and below the kernel's ephemeral range. A port from bind(0) lies in that
    range, where any process's next outgoing connection can take it before the server it is meant for binds it (a
    Ray head's dashboard agent once lost its gRPC port so, and the head died starting); below the range only an
    explicit bind can. From 20000 up: a Ray node's worker processes take 10002-19999 by default."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            first_ephemeral = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        first_ephemeral = 0
    if first_ephemeral > 22000:
        for _ in range(200):
            port = 20000 + secrets.randbelow(first_ephemeral - 20000)
            with socket.socket() as s:
                try:
                    s.bind((LOOPBACK, port))
                except OSError:
                    continue
                return port
    with socket.socket() as s:  # no usable range below the ephemeral one: any free port
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


@dataclass
class LocalRayHead:
    dashboard_url: str   # job submission address (`ray job submit --address`)
    gcs_address: str     # `ray.init(address=...)`
    pid: int
    temp_dir: str
    log_path: str
    auth_env: dict[str, str]  # what a client (`ray job submit`, ray.init) needs to be let in

    def client_env(self) -> dict[str, str]:
        return {**os.environ, **self.auth_env}


def _wait_ready(url: str, proc: subprocess.Popen, log_path: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"local Ray head exited with code {proc.returncode} while starting; "
                               f"see {log_path}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"local Ray head: no answer from {url} within {timeout:.0f}s; see {log_path}")


# Stops a process tree when the process that started it is gone, however it ended (SIGKILL included): it waits
# on a pipe whose only writer is that process. A byte means "stopped it myself, go"; end-of-file means it died.
# Then: SIGTERM to the head's process group (Ray tears down in order), and after a grace period SIGKILL to every
# process that was below the head when the launcher died (Ray puts workers and job drivers in groups and
# sessions of their own: only the tree finds them all).
_TREE_WATCHDOG = """
import os, signal, sys, time
root = int(sys.argv[1])
if sys.stdin.buffer.read(1):
    sys.exit(0)

def below(pid):
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for t in tasks:
            try:
                kids = [int(k) for k in open(f"/proc/{p}/task/{t}/children").read().split()]
            except OSError:
                kids = []
            found += kids
            todo += kids
    return found

tree = below(root)
try:
    os.killpg(root, signal.SIGTERM)
except ProcessLookupError:
    pass
deadline = time.monotonic() + 5.0
while time.monotonic() < deadline and any(os.path.exists(f"/proc/{p}") for p in [root, *tree]):
    time.sleep(0.1)
for p in [root, *tree]:
    try:
        os.kill(p, signal.SIGKILL)
    except ProcessLookupError:
        pass
try:
    os.killpg(root, signal.SIGKILL)
except ProcessLookupError:
    pass
"""


def watch_tree(root: int) -> subprocess.Popen:
    """A watchdog (in a session of its own, so a kill of our process group spares it) that stops process `root`
    (a session leader) and everything below it if this process dies first; `release_watch` dismisses it."""
    return subprocess.Popen([sys.executable, "-c", _TREE_WATCHDOG, str(root)], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def release_watch(watchdog: subprocess.Popen) -> None:
    try:
        watchdog.stdin.write(b"x")
        watchdog.stdin.close()
    except OSError:
        pass
    watchdog.wait(timeout=30)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def stop_process_group(proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """Stop a child started with start_new_session=True: SIGTERM the leader first (the Ray head tears down
    what it started, in order), then SIGTERM and finally SIGKILL whatever is left in its process group."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
    for sig in (signal.SIGTERM, signal.SIGKILL):
        deadline = time.monotonic() + 5.0
        if _group_alive(proc.pid):
            os.killpg(proc.pid, sig)
        while _group_alive(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
    proc.wait(timeout=timeout)


@contextmanager
def local_ray_head(num_cpus: int | None = None, object_store_mb: int | None = None,
                   env: dict[str, str] | None = None, startup_timeout: float = 180.0, keep_logs: bool = False):
    """Start `ray start --head --block` on 127.0.0.1 with free ports; yield a LocalRayHead; stop it by PID."""
    temp_dir = tempfile.mkdtemp(prefix="digray-", dir="/tmp")  # short: Ray's unix socket paths are limited
    log_path = os.path.join(temp_dir, "head.log")
    gcs_port, dashboard_port, agent_port = free_port(), free_port(), free_port()
    # Token authentication with a token of our own: loopback is shared with everyone on this machine, and an
    # explicit mode keeps us independent of whatever ~/.ray/auth_token other Ray users left behind.
    token_path = os.path.join(temp_dir, "auth_token")
    with open(os.open(token_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
        f.write(secrets.token_hex(32))
    auth_env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": token_path}
    cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
           f"--node-ip-address={LOOPBACK}", f"--port={gcs_port}",
           "--include-dashboard=true", f"--dashboard-host={LOOPBACK}", f"--dashboard-port={dashboard_port}",
           f"--ray-client-server-port={free_port()}", f"--node-manager-port={free_port()}",
           f"--object-manager-port={free_port()}", f"--dashboard-agent-listen-port={agent_port}",
           f"--dashboard-agent-grpc-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
           f"--metrics-export-port={free_port()}",
           f"--num-cpus={num_cpus or os.cpu_count() or 1}", "--disable-usage-stats", f"--temp-dir={temp_dir}"]
    if object_store_mb:
        cmd.append(f"--object-store-memory={object_store_mb * 1024 * 1024}")
    venv_bin = os.path.dirname(sys.executable)
    head_env = {**os.environ, **(env or {}), **auth_env,
                "PATH": venv_bin + os.pathsep + os.environ.get("PATH", ""),
                "RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
                # a throwaway head has nothing to drain; the default waits 30 s on SIGTERM
                "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    head_env.pop("RAY_ADDRESS", None)
    head_env.pop("RAY_AUTH_TOKEN", None)
    print(f"[ray] starting a local Ray head on {LOOPBACK} (dashboard port {dashboard_port}, "
          f"logs in {temp_dir})", file=sys.stderr, flush=True)
    ok = False
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=head_env,
                                start_new_session=True)
        watchdog = watch_tree(proc.pid)   # a SIGKILLed launcher must not leave the head (and its job) running
        try:
            dashboard_url = f"http://{LOOPBACK}:{dashboard_port}"
            started = time.monotonic()
            _wait_ready(dashboard_url + "/api/version", proc, log_path, startup_timeout)
            # Jobs are run by the node's dashboard agent, which comes up after the dashboard; a submission waits
            # only 10 s for it (Ray's WAIT_AVAILABLE_AGENT_TIMEOUT) and is then refused ("No available agent to
            # submit job"), which a busy machine reached. The agent registers itself right after its HTTP server
            # answers.
            _wait_ready(f"http://{LOOPBACK}:{agent_port}/", proc, log_path,
                        startup_timeout - (time.monotonic() - started))
            yield LocalRayHead(dashboard_url=dashboard_url, gcs_address=f"{LOOPBACK}:{gcs_port}",
                               pid=proc.pid, temp_dir=temp_dir, log_path=log_path, auth_env=auth_env)
            ok = True
        finally:
            stop_process_group(proc)
            release_watch(watchdog)
            print(f"[ray] local Ray head (pid {proc.pid}) stopped", file=sys.stderr, flush=True)
    if ok and not keep_logs:
        shutil.rmtree(temp_dir, ignore_errors=True)
