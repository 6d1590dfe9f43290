"""`python -m launch.train` as users run it (torchrun, 2 CPU ranks, DeepSpeed ZeRO-3 on gloo): clean stops on
SIGINT/SIGTERM, one-line errors with exit code 2, and no process left behind when the launcher is SIGKILLed."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from dig.data.synthetic import write_synthetic_dataset

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "train", "tiny-cpu.yaml")


def launch_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_TRACKING_URI", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
                        "NNODES", "NODE_RANK", "HOSTFILE")}
    env.update({"TORCH_EXTENSIONS_DIR": os.path.join(REPO, ".torch_extensions"), "DS_ACCELERATOR": "cpu",
                "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO, "GPUS_PER_NODE": "2", **extra})
    return env


def start_launch(tmp_path, *overrides: str) -> subprocess.Popen:
    """The launcher in its own process group, as a shell runs a foreground job (Ctrl-C = SIGINT to that group)."""
    cmd = [sys.executable, "-m", "launch.train", "--config", TINY, "--", "run.dir=run", "tracking.sample_every=0",
           "data.global_batch_size=4", "data.micro_batch_size=2", f"data.path={tmp_path / 'latents'}",
           *overrides]
    return subprocess.Popen(cmd, cwd=tmp_path, env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


@pytest.fixture
def latents(tmp_path):
    write_synthetic_dataset(str(tmp_path / "latents"), num_shards=4, samples_per_shard=8)
    return tmp_path / "latents"


def wait_for_steps(proc, log, n: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not (log.exists() and len(log.read_text().splitlines()) >= n):
        if proc.poll() is not None or time.monotonic() > deadline:
            out, err = proc.communicate(timeout=60) if proc.poll() is not None else ("", "")
            kill_tree(proc)
            raise AssertionError(f"no step {n} (rc {proc.returncode}): {err[-3000:]}")
        time.sleep(0.1)


def descendants(pid: int) -> set[int]:
    found, todo = set(), [pid]
    while todo:
        p = todo.pop()
        for path in _task_children_files(p):
            try:
                kids = [int(x) for x in open(path).read().split()]
            except OSError:
                kids = []
            for k in kids:
                if k not in found:
                    found.add(k)
                    todo.append(k)
    return found


def _task_children_files(pid: int) -> list[str]:
    try:
        return [f"/proc/{pid}/task/{t}/children" for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return []


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def kill_tree(proc) -> None:
    for pid in descendants(proc.pid) | {proc.pid}:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_ctrl_c_checkpoints_and_says_how_to_resume(tmp_path, latents):
    """Ctrl-C (SIGINT to the launcher's process group; SIGTERM takes the same path, and is checked for a single
    process in test_train_single.py)."""
    proc = start_launch(tmp_path, "steps=100000", "checkpoint.every=100000", "tracking.step_log=true")
    log = tmp_path / "run" / "steps" / "rank_00000.jsonl"
    wait_for_steps(proc, log, 2)
    os.killpg(proc.pid, signal.SIGINT)
    try:
        out, err = proc.communicate(timeout=180)
    finally:
        kill_tree(proc)
    from dig.train.checkpoint import latest_checkpoint

    steps = len(log.read_text().splitlines())
    latest = latest_checkpoint(str(tmp_path / "run"))
    assert latest.endswith(f"step_{steps:09d}")
    assert proc.returncode == 75, err[-3000:]
    assert "Traceback" not in err and "Exception" not in err, err[-3000:]
    lines = [ln for ln in err.splitlines() if "stopped at step" in ln]
    assert lines == [f"dig train: stopped at step {steps}; checkpoint {latest}; run the same command to resume"], err


@pytest.mark.parametrize("override, message", [
    ("data.path=nowhere", "no manifest.json at nowhere"),
    ("optim.lr=-0.001", "optim.lr: Input should be greater than or equal to 0"),
])
def test_user_errors_are_one_message_and_exit_code_2(tmp_path, latents, override, message):
    proc = start_launch(tmp_path, override)
    try:
        out, err = proc.communicate(timeout=180)
    finally:
        kill_tree(proc)
    assert proc.returncode == 2, err[-3000:]
    assert err.count(message) == 1, err[-3000:]                      # once, not once per rank
    assert "Traceback" not in err and "ChildFailedError" not in err, err[-3000:]


def test_s3_path_without_credentials_is_a_message(tmp_path):
    env = launch_env(AWS_ACCESS_KEY_ID="", AWS_SECRET_ACCESS_KEY="", AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "x"),
                     AWS_CONFIG_FILE=str(tmp_path / "x"), AWS_EC2_METADATA_DISABLED="true",
                     AWS_ENDPOINT_URL="http://127.0.0.1:9")
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        env.pop(k, None)
    env.pop("GPUS_PER_NODE")
    done = subprocess.run([sys.executable, "-m", "dig.cli", "train", "--config", TINY, "data.path=s3://bucket/x"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "no AWS credentials found" in done.stderr and "Traceback" not in done.stderr, done.stderr[-3000:]


def test_sigkill_of_the_launcher_leaves_no_process(tmp_path, latents):
    """SIGKILL of the launcher alone: torchrun and the ranks (in sessions of their own), the reader's loading
    processes, all gone within seconds; nothing trains on beside a restarted run."""
    proc = start_launch(tmp_path, "steps=100000", "checkpoint.every=100000", "tracking.step_log=true")
    log = tmp_path / "run" / "steps" / "rank_00000.jsonl"
    wait_for_steps(proc, log, 2)
    children = descendants(proc.pid)
    assert len(children) >= 3, children   # torchrun + 2 ranks (+ their loading processes)
    try:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 10
        while any(alive(p) for p in children) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = {p: open(f"/proc/{p}/cmdline").read().replace("\0", " ")[:200] for p in children if alive(p)}
        assert not left, left
        steps = len(log.read_text().splitlines())
        time.sleep(2)
        assert len(log.read_text().splitlines()) == steps   # nobody is still training
    finally:
        for p in children:
            if alive(p):
                os.kill(p, signal.SIGKILL)


def test_sigkill_of_preprocess_stops_its_local_ray_head_and_job(tmp_path):
    """`python -m launch.preprocess` without RAY_ADDRESS starts a Ray head for the job; SIGKILL of the launcher
    alone must take the head, its processes, the job's driver and the submitting client with it."""
    from PIL import Image
    import numpy as np

    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (tmp_path / "images" / cls).mkdir(parents=True)
        for i in range(40):
            Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(tmp_path / "images" / cls / f"{i}.png")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
    env.update(PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    err_path = tmp_path / "preprocess.err"
    with open(err_path, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "launch.preprocess", "--input", str(tmp_path / "images"),
                                 "--output", str(tmp_path / "latents"), "--num-cpus", "2", "--object-store-mb", "100",
                                 "--", "--vae", "config:tiny", "--resolution", "32", "--min-side", "16",
                                 "--shard-size", "4", "--encode-batch-size", "2"],
                                cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    children: set[int] = set()
    try:
        deadline = time.monotonic() + 240
        # the job is running once its driver (python -m data_pipeline) is among the launcher's descendants
        while time.monotonic() < deadline and proc.poll() is None:
            children = descendants(proc.pid)
            cmdlines = []
            for p in children:
                try:
                    cmdlines.append(open(f"/proc/{p}/cmdline").read())
                except OSError:
                    pass
            if any("data_pipeline" in c and "job" not in c for c in cmdlines):
                break
            time.sleep(0.5)
        assert proc.poll() is None and time.monotonic() < deadline, err_path.read_text()[-3000:]
        time.sleep(1)
        children = descendants(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 15   # the watchdog gives Ray 5 s to stop in order, then SIGKILLs the rest
        while any(alive(p) for p in children) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = {}
        for p in children:
            if alive(p):
                try:
                    left[p] = open(f"/proc/{p}/cmdline").read().replace("\0", " ")[:150]
                except OSError:
                    pass
        assert not left, left
    finally:
        for p in children:
            if alive(p):
                try:
                    os.kill(p, signal.SIGKILL)
                except ProcessLookupError:
                    pass
