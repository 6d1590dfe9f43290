"""One trainer per run directory: the lease lock on a local folder and on S3 (moto over HTTP)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from dig.train import run_lock
from dig.train.run_lock import LOCK_FILE, RunLockError, acquire_run_lock


def foreign_holder(heartbeat_age: float, host: str = "node-elsewhere", pid: int = 4242) -> dict:
    return {"host": host, "pid": pid, "token": "t-foreign", "started": "2026-01-01T00:00:00+00:00",
            "heartbeat": time.time() - heartbeat_age}


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_second_trainer_is_refused_with_the_holders_name(tmp_path):
    lock = acquire_run_lock(str(tmp_path), None, lease_s=30)
    try:
        with pytest.raises(RunLockError) as err:
            acquire_run_lock(str(tmp_path), None, lease_s=30)
        msg = str(err.value)
        assert f"host {socket.gethostname()}, pid {os.getpid()}, started " in msg and "live trainer" in msg
    finally:
        lock.release()
    assert not (tmp_path / LOCK_FILE).exists()
    acquire_run_lock(str(tmp_path), None, lease_s=30).release()  # free again


def test_lock_of_a_dead_process_on_this_host_is_taken_over_at_once(tmp_path):
    (tmp_path / LOCK_FILE).write_text(json.dumps(foreign_holder(0.0, host=socket.gethostname(), pid=dead_pid())))
    t0 = time.monotonic()
    lock = acquire_run_lock(str(tmp_path), None, lease_s=600)
    assert time.monotonic() - t0 < 2
    assert json.loads((tmp_path / LOCK_FILE).read_text())["token"] == lock.token
    lock.release()


def test_expired_lease_from_another_host_is_taken_over(tmp_path):
    (tmp_path / LOCK_FILE).write_text(json.dumps(foreign_holder(heartbeat_age=5.0)))
    lock = acquire_run_lock(str(tmp_path), None, lease_s=2)
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()


def test_another_host_whose_heartbeat_stopped_is_waited_out(tmp_path):
    """Fresh lock, heartbeat not moving (its trainer was killed on another node): taken once the lease ran out."""
    (tmp_path / LOCK_FILE).write_text(json.dumps(foreign_holder(heartbeat_age=0.0)))
    t0 = time.monotonic()
    lock = acquire_run_lock(str(tmp_path), None, lease_s=1.5)
    assert 1.0 < time.monotonic() - t0 < 10
    lock.release()


def test_another_host_with_a_live_heartbeat_refuses(tmp_path):
    path = tmp_path / LOCK_FILE
    path.write_text(json.dumps(foreign_holder(heartbeat_age=0.0)))
    # the other node's heartbeat thread, simulated: refreshes well within the lease
    beat = subprocess.Popen([sys.executable, "-c", f"""
import json, time
for _ in range(40):
    time.sleep(0.1)
    rec = json.load(open({str(path)!r})); rec['heartbeat'] = time.time()
    open({str(path)!r} + '.x', 'w').write(json.dumps(rec))
    import os; os.replace({str(path)!r} + '.x', {str(path)!r})
"""])
    try:
        with pytest.raises(RunLockError, match="host node-elsewhere, pid 4242"):
            acquire_run_lock(str(tmp_path), None, lease_s=3)
    finally:
        beat.kill()
        beat.wait()


def test_heartbeat_keeps_a_long_run_locked(tmp_path):
    lock = acquire_run_lock(str(tmp_path), None, lease_s=0.8)
    try:
        time.sleep(1.6)  # two leases: without heartbeats it would have expired
        with pytest.raises(RunLockError):
            acquire_run_lock(str(tmp_path), None, lease_s=0.8)
        assert lock.lost is None
    finally:
        lock.release()


def test_s3_lock_is_exclusive_and_released(tmp_path, s3_bucket):
    import boto3

    uri = f"s3://{s3_bucket}/run"
    lock = acquire_run_lock(str(tmp_path / "a"), uri, lease_s=30)
    try:
        body = boto3.client("s3").get_object(Bucket=s3_bucket, Key=f"run/{LOCK_FILE}")["Body"].read()
        assert json.loads(body)["token"] == lock.token
        # another machine: its own run dir, the same S3 checkpoint root
        with pytest.raises(RunLockError, match=f"s3://{s3_bucket}/run/{LOCK_FILE} is locked"):
            acquire_run_lock(str(tmp_path / "b"), uri, lease_s=30)
        assert not (tmp_path / "b" / LOCK_FILE).exists()  # a refusal leaves nothing behind
    finally:
        lock.release()
    assert "Contents" not in boto3.client("s3").list_objects_v2(Bucket=s3_bucket, Prefix="run/")


def test_s3_stale_lock_is_taken_over_by_exactly_one(tmp_path, s3_bucket):
    import boto3

    boto3.client("s3").put_object(Bucket=s3_bucket, Key=f"run/{LOCK_FILE}",
                                  Body=json.dumps(foreign_holder(heartbeat_age=100.0)).encode())
    backend = run_lock._S3Backend(f"s3://{s3_bucket}/run/{LOCK_FILE}")
    _, stale_etag = backend.read()
    first = backend.replace({"token": "one", "heartbeat": time.time()}, stale_etag)
    second = backend.replace({"token": "two", "heartbeat": time.time()}, stale_etag)
    assert first is not None and second is None  # conditional PUT: the second contender lost
    lock = acquire_run_lock(str(tmp_path), f"s3://{s3_bucket}/run", lease_s=1)  # "one" never beats: expires
    lock.release()


@pytest.mark.slow
def test_dig_train_refuses_a_live_run_and_takes_over_a_killed_ones_lock(tmp_path):
    """Through `dig train` (one process, CPU): a second trainer on a live run dir exits 2 naming the holder; after
    SIGKILL of the first, the same command starts at once. Files follow the umask (0027 here → 0640, not 0600)."""
    import signal
    import stat

    from dig.data.synthetic import write_synthetic_dataset

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    write_synthetic_dataset(str(tmp_path / "latents"), num_shards=2, samples_per_shard=8)
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": os.path.join(repo, ".torch_extensions"), "DS_ACCELERATOR": "cpu",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": repo}
    for k in ("MLFLOW_TRACKING_URI", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)

    def cmd(*extra):
        return [sys.executable, "-m", "dig.cli", "train", "--config", os.path.join(repo, "configs/train/tiny-cpu.yaml"),
                "run.dir=run", f"data.path={tmp_path / 'latents'}", "tracking.sample_every=0", "tracking.step_log=true",
                "data.global_batch_size=4", "data.micro_batch_size=4", *extra]

    def umask_027():
        os.umask(0o027)

    first = subprocess.Popen(cmd("steps=100000", "checkpoint.every=100000"), cwd=tmp_path, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        steps = tmp_path / "run" / "steps" / "rank_00000.jsonl"
        deadline = time.monotonic() + 240
        while not steps.exists():
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        second = subprocess.run(cmd("steps=2"), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, second.stderr[-3000:]
        line = [ln for ln in second.stderr.splitlines() if ln.startswith("dig train:")]
        assert len(line) == 1 and f"host {socket.gethostname()}, pid {first.pid}, started " in line[0], line
        assert first.poll() is None  # the live run was not disturbed
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    third = subprocess.run(cmd("steps=2", "checkpoint.every=1"), cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=300, preexec_fn=umask_027)
    assert third.returncode == 0, third.stderr[-3000:]
    assert "took over the lock" in third.stderr and "its process is gone" in third.stderr
    assert not (tmp_path / "run" / LOCK_FILE).exists()  # released at exit
    ckpt = tmp_path / "run" / "checkpoints" / "step_000000002"
    files = [p for p in ckpt.rglob("*") if p.is_file()] + [tmp_path / "run" / "checkpoints" / "latest"]
    assert len(files) >= 5
    for p in files:
        mode = stat.S_IMODE(p.stat().st_mode) & ~0o111  # recovery scripts are made executable
        assert mode == 0o640, (p, oct(mode))
    from dig.train.export import WEIGHTS_FILE, export

    old = os.umask(0o022)
    try:
        out = export(str(tmp_path / "run"), str(tmp_path / "export"))
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(os.path.join(out, WEIGHTS_FILE)).st_mode) == 0o644


def test_a_lock_taken_over_behind_the_holders_back_is_reported_lost(tmp_path):
    """The holder stalled past its lease and another trainer took over: the next heartbeat notices, and the
    trainer stops (Trainer.collect_checkpoint raises on `lost`) instead of writing into the other's run."""
    lock = acquire_run_lock(str(tmp_path), None, lease_s=0.4)
    try:
        (tmp_path / LOCK_FILE).write_text(json.dumps(foreign_holder(0.0, host="node-b", pid=77)))
        deadline = time.monotonic() + 5
        while lock.lost is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert lock.lost is not None and "host node-b, pid 77" in lock.lost
    finally:
        lock.release()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == 77  # the new holder's lock stays
