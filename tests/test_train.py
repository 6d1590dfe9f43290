"""End to end on CPU over loopback: two processes with DeepSpeed ZeRO-3 over gloo train a tiny DiG on shards
served by moto's S3 server, logging to a real `mlflow server`.

References are independent of the trainer: per-step weights consolidated from the ZeRO-3 checkpoints by
DeepSpeed's zero_to_fp32, a float64 EMA recurrence over them, the per-step records of an uninterrupted run,
and what MLflow's own client reads back from the server.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import boto3
import numpy as np
import psutil
import pytest
import torch

from dig.data.synthetic import write_synthetic_dataset
from mlflow_server import mlflow_tracking_server  # noqa: F401  (fixture)
from servers import free_port

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "train", "tiny-cpu.yaml")
SEED, DECAY, STEPS = 5, 0.5, 6
MODEL = dict(depth=2, hidden_size=64, num_heads=2)


def common_overrides(run_dir: str, data: str, tracking_uri: str) -> list[str]:
    return [f"run.dir={run_dir}", f"run.seed={SEED}", f"data.path={data}", "data.global_batch_size=8",
            "data.micro_batch_size=2",  # 2 ranks x 2 x 2 accumulation steps
            "data.shuffle_window_shards=2", f"steps={STEPS}", f"ema_decay={DECAY}", "optim.warmup_steps=2",
            "tracking.log_every=1", "tracking.sample_every=3", "tracking.step_log=true",
            "tracking.sample.num_steps=4", f"tracking.uri={tracking_uri}", "tracking.experiment=test-train"]


def env_for(s3_server) -> dict:
    env = {**os.environ, **s3_server.env(), "TORCH_EXTENSIONS_DIR": os.path.join(REPO, ".torch_extensions"),
           "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def torchrun(overrides: list[str], env: dict, cwd: str, module: str = "torch.distributed.run") -> subprocess.Popen:
    port = free_port()
    cmd = [sys.executable, "-m", module, "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={port}", "-m", "dig.cli", "train", "--config", TINY, *overrides]
    log = open(os.path.join(cwd, f"train-{time.monotonic_ns()}.log"), "wb")
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    proc.log_path = log.name
    proc.master_port = port
    return proc


def shm_left_by(proc: subprocess.Popen) -> list[str]:
    """DeepSpeed's CPU all-reduce workspaces of a launch still in /dev/shm (66 MB per rank)."""
    import glob

    return glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{proc.master_port}_*")


def cmdline_of(p: psutil.Process) -> list[str]:
    try:
        return p.cmdline()
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return []


def kill_launch(proc: subprocess.Popen) -> list[list[str]]:
    """SIGKILL torchrun and every process under it (torchrun starts its workers in their own process groups);
    returns their command lines, all read before the first signal: the workers die with torchrun
    (dig.lifeline's parent-death signal), so a command line read after killing torchrun may already be gone."""
    launch = psutil.Process(proc.pid)
    procs = [launch, *launch.children(recursive=True)]
    cmdlines = [cmdline_of(p) for p in procs]
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=30)
    _, alive = psutil.wait_procs(procs, timeout=30)
    assert not alive, f"still alive after SIGKILL: {alive}"
    return cmdlines


def finish(proc: subprocess.Popen, timeout: float = 240, expected: int = 0) -> None:
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_launch(proc)
        raise
    if rc != expected:
        with open(proc.log_path) as f:
            raise AssertionError(f"training exited with {rc}:\n{f.read()[-6000:]}")


def step_records(run_dir: str, rank: int) -> dict[int, dict]:
    """The last record of every step (a killed run may have logged steps that the resumed run redid)."""
    out = {}
    with open(os.path.join(run_dir, "steps", f"rank_{rank:05d}.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            out[rec["step"]] = rec
    return out


@pytest.fixture(scope="module")
def s3_latents(s3_server):
    bucket = f"train-latents-{os.getpid()}"
    boto3.client("s3", endpoint_url=s3_server.endpoint_url).create_bucket(Bucket=bucket)
    # the s3_server fixture points this process's AWS environment at the loopback server
    write_synthetic_dataset(f"s3://{bucket}/latents", num_shards=4, samples_per_shard=6, latent_size=8,
                            channels=4, num_classes=10)
    return f"s3://{bucket}/latents"


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, s3_server, s3_latents, mlflow_tracking_server):
    """6 steps uninterrupted, a checkpoint after every step (kept) for the EMA reference."""
    work = str(tmp_path_factory.mktemp("straight"))
    run_dir = os.path.join(work, "run")
    overrides = common_overrides(run_dir, s3_latents, mlflow_tracking_server.uri) + [
        "checkpoint.every=1", "checkpoint.keep_last=10"]
    finish(torchrun(overrides, env_for(s3_server), work))
    return run_dir


@pytest.fixture(scope="module")
def killed_and_resumed_run(tmp_path_factory, s3_server, s3_latents, mlflow_tracking_server):
    """Checkpoint at step 3, SIGKILL of torchrun and both workers (no clean exit), then the same command.
    This run also recomputes activations per block (model.grad_checkpointing), and resumes with the SwiGLU's own
    recompute switched from off to on (model.overrides.mlp_recompute, a runtime option): neither may change a bit."""
    work = str(tmp_path_factory.mktemp("resumed"))
    run_dir = os.path.join(work, "run")
    overrides = common_overrides(run_dir, s3_latents, mlflow_tracking_server.uri) + [
        "checkpoint.every=3", "model.grad_checkpointing=true"]
    env = env_for(s3_server)
    first = torchrun(overrides + ["model.overrides.mlp_recompute=false"], env, work)
    marker = os.path.join(run_dir, "checkpoints", "latest")
    deadline = time.monotonic() + 240
    while not (os.path.exists(marker) and open(marker).read().strip() == "step_000000003"):
        assert first.poll() is None, f"first run ended early ({first.returncode}); log: {first.log_path}"
        assert time.monotonic() < deadline, "no checkpoint at step 3"
        time.sleep(0.02)
    killed = kill_launch(first)
    assert sum("dig.cli" in cmd for cmd in killed[1:]) == 2, f"expected torchrun and two workers: {killed}"
    assert not shm_left_by(first)  # even a SIGKILL leaves no shared memory behind
    assert first.returncode == -signal.SIGKILL
    killed_at = open(marker).read().strip()
    with open(os.path.join(run_dir, "tracking.json")) as f:
        first_mlflow_run = json.load(f)["run_id"]
    logged_before = [len(open(os.path.join(run_dir, "steps", f"rank_{r:05d}.jsonl")).readlines()) for r in (0, 1)]
    finish(torchrun(overrides + ["model.overrides.mlp_recompute=true"], env, work))
    redone = []
    for r, n in zip((0, 1), logged_before):
        with open(os.path.join(run_dir, "steps", f"rank_{r:05d}.jsonl")) as f:
            redone.append([json.loads(line)["step"] for line in f.readlines()[n:]])
    return run_dir, killed_at, first_mlflow_run, redone


def test_exact_resume_after_sigkill(straight_run, killed_and_resumed_run):
    run_dir, killed_at, _, redone = killed_and_resumed_run
    assert killed_at == "step_000000003"
    assert redone == [[4, 5, 6], [4, 5, 6]]  # the second launch resumed at step 3 and did the rest
    for rank in (0, 1):
        want, got = step_records(straight_run, rank), step_records(run_dir, rank)
        assert sorted(want) == sorted(got) == list(range(1, STEPS + 1))
        for step in want:
            assert got[step]["keys"] == want[step]["keys"], f"rank {rank} step {step}: different samples"
            assert len(set(got[step]["keys"])) == 4
            for k in ("loss", "mse", "vb"):
                assert got[step][k] == want[step][k], f"rank {rank} step {step}: {k} differs"
    # ranks read disjoint samples at every step
    r0, r1 = step_records(straight_run, 0), step_records(straight_run, 1)
    assert all(not set(r0[s]["keys"]) & set(r1[s]["keys"]) for s in r0)


def test_resumed_run_continues_the_same_mlflow_run(killed_and_resumed_run, mlflow_tracking_server):
    from mlflow import MlflowClient

    run_dir, _, first_run_id, _ = killed_and_resumed_run
    with open(os.path.join(run_dir, "tracking.json")) as f:
        assert json.load(f)["run_id"] == first_run_id
    client = MlflowClient(tracking_uri=mlflow_tracking_server.uri)
    run = client.get_run(first_run_id)
    assert run.info.status == "FINISHED" and run.data.tags["last_resume_step"] == "3"
    steps = {m.step for m in client.get_metric_history(first_run_id, "loss")}
    assert steps == set(range(1, STEPS + 1))


def test_metrics_and_sample_image_visible_in_mlflow(straight_run, mlflow_tracking_server, tmp_path):
    from mlflow import MlflowClient
    from PIL import Image

    with open(os.path.join(straight_run, "tracking.json")) as f:
        run_id = json.load(f)["run_id"]
    client = MlflowClient(tracking_uri=mlflow_tracking_server.uri)
    run = client.get_run(run_id)
    records = step_records(straight_run, 0)
    history = {m.step: m.value for m in client.get_metric_history(run_id, "loss")}
    assert history == pytest.approx({s: r["loss"] for s, r in records.items()}, rel=1e-6)
    for key in ("mse", "vb", "lr", "grad_norm", "img_per_sec", "nonfinite_skipped", "shards_skipped"):
        assert key in run.data.metrics, key
    lr = {m.step: m.value for m in client.get_metric_history(run_id, "lr")}
    assert lr[1] == pytest.approx(0.5e-3) and lr[2] == pytest.approx(1e-3) and lr[6] == pytest.approx(1e-3)
    assert run.data.params["data.micro_batch_size"] == "2" and run.data.params["model.name"] == "DiG-S/2"
    assert run.data.tags["checkpoint.latest"].endswith("step_000000006")
    # the step-keyed image "samples" (MLflow stores it as images/samples+step+N+...png, plus a compressed .webp)
    names = sorted(a.path for a in client.list_artifacts(run_id, "images") if a.path.endswith(".png"))
    assert [int(re.search(r"samples\+step\+(\d+)\+", n).group(1)) for n in names] == [3, 6]
    local = client.download_artifacts(run_id, names[-1], str(tmp_path))
    image = Image.open(local)
    assert image.size == (128, 2 * (64 + 12))  # 4 samples of 64x64 in a 2x2 grid, a 12 px caption under each
    assert np.asarray(image).std() > 0


def consolidated(ckpt: str) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(ckpt, tag="engine")


@pytest.fixture(scope="module")
def reference_ema(straight_run) -> dict[str, torch.Tensor]:
    """float64 EMA over the initial weights and the consolidated weights after each of the 6 steps."""
    from dig.models import create_model

    torch.manual_seed(SEED)  # the trainer's documented initialisation: same seed, then create_model
    w0 = create_model("DiG-S/2", input_size=8, num_classes=10, **MODEL).state_dict()
    ema = {k: v.double() for k, v in w0.items()}
    for step in range(1, STEPS + 1):
        weights = consolidated(os.path.join(straight_run, "checkpoints", f"step_{step:09d}"))
        assert set(weights) == set(ema)
        ema = {k: DECAY * ema[k] + (1 - DECAY) * weights[k].double() for k in ema}
    return ema


def test_ema_equals_ema_of_consolidated_weights(straight_run, reference_ema):
    from safetensors.torch import load_file

    ema = load_file(os.path.join(straight_run, "checkpoints", f"step_{STEPS:09d}", "ema.safetensors"))
    final = consolidated(os.path.join(straight_run, "checkpoints", f"step_{STEPS:09d}"))
    assert set(ema) == set(reference_ema)
    moved = 0
    for k, ref in reference_ema.items():
        torch.testing.assert_close(ema[k].double(), ref, rtol=1e-6, atol=1e-7, msg=k)
        moved += int(not torch.allclose(ema[k], final[k]))
    assert moved > len(ema) // 2  # the EMA is not just the current weights


def test_export_reproduces_the_ema_model(straight_run, reference_ema, tmp_path):
    from dig.cli import main
    from dig.models import create_model
    from dig.train.export import load_exported

    out = str(tmp_path / "export")
    assert main(["export", straight_run, "--out", out]) == 0
    model, info = load_exported(out)
    assert info["step"] == STEPS and info["latent_shape"] == [4, 8, 8]
    reference = create_model("DiG-S/2", input_size=8, num_classes=10, **MODEL).eval()
    reference.load_state_dict({k: v.float() for k, v in reference_ema.items()})
    g = torch.Generator().manual_seed(0)
    x, t, y = torch.randn(3, 4, 8, 8, generator=g), torch.tensor([1, 500, 999]), torch.tensor([0, 3, 10])
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, y), reference(x, t, y), rtol=1e-5, atol=1e-5)
    png = str(tmp_path / "grid.png")
    assert main(["sample", out, "--out", png, "--num-images", "2", "--sampling-steps", "3",
                 "--vae", "config:tiny"]) == 0
    from PIL import Image

    assert Image.open(png).size == (128, 64)


def test_sample_straight_from_a_run_directory(straight_run, tmp_path):
    """A run directory holds config.json (the training config) but no weights: sample must export it first."""
    from PIL import Image

    from dig.cli import main

    png = str(tmp_path / "grid.png")
    assert main(["sample", straight_run, "--out", png, "--num-images", "2", "--sampling-steps", "2",
                 "--vae", "config:tiny"]) == 0
    assert Image.open(png).size == (128, 64)


def test_sigterm_to_one_rank_stops_both_with_a_checkpoint(tmp_path):
    """The stop request travels with the loss statistics: SIGTERM to rank 1 alone (as a node-level preemption
    might deliver it) ends both ranks after the same step, with a checkpoint of that step, and exit status 75
    (a clean stop; through launch.torchrun, which `python -m launch.train` runs, as plain torchrun reports any
    non-zero exit of a rank as a failure)."""
    write_synthetic_dataset(str(tmp_path / "latents"), num_shards=4, samples_per_shard=8, latent_size=8,
                            channels=4, num_classes=10)
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": os.path.join(REPO, ".torch_extensions"), "DS_ACCELERATOR": "cpu",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    env.pop("MLFLOW_TRACKING_URI", None)
    run_dir = str(tmp_path / "run")
    proc = torchrun([f"run.dir={run_dir}", f"data.path={tmp_path / 'latents'}", "data.global_batch_size=4",
                     "data.micro_batch_size=2", "steps=100000", "checkpoint.every=100000", "tracking.step_log=true",
                     "tracking.sample_every=0", "tracking.log_every=5"], env, str(tmp_path), module="launch.torchrun")
    logs = [os.path.join(run_dir, "steps", f"rank_{r:05d}.jsonl") for r in (0, 1)]
    deadline = time.monotonic() + 240
    while not (os.path.exists(logs[1]) and len(open(logs[1]).readlines()) >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, f"no steps logged; log: {proc.log_path}"
        time.sleep(0.05)
    rank1 = [p for p in psutil.Process(proc.pid).children(recursive=True)
             if "dig.cli" in cmdline_of(p) and p.environ().get("RANK") == "1"]
    assert len(rank1) == 1
    rank1[0].send_signal(signal.SIGTERM)
    finish(proc, timeout=120, expected=75)
    assert not shm_left_by(proc)
    steps = [len(open(log).readlines()) for log in logs]
    assert steps[0] == steps[1] >= 2
    marker = os.path.join(run_dir, "checkpoints", "latest")
    assert open(marker).read().strip() == f"step_{steps[0]:09d}"


# --- checkpoints on S3, written in the background, through a proxy that injects faults --------------------------

def s3_keys(bucket: str, prefix: str) -> list[str]:
    client = boto3.client("s3")
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def s3_latest(bucket: str, prefix: str) -> str | None:
    client = boto3.client("s3")
    try:
        return client.get_object(Bucket=bucket, Key=f"{prefix}/latest")["Body"].read().decode()
    except client.exceptions.NoSuchKey:
        return None


@pytest.fixture(scope="module")
def s3_checkpointed_run(tmp_path_factory, s3_server, s3_latents, mlflow_tracking_server):
    """checkpoint.uri=s3://… behind a proxy that resets uploads mid-body, answers 503/500 and delays every write.
    Checkpoints at steps 2, 4, 6; SIGKILL of everything while step 4 is being uploaded (step 2 complete, part of
    step 4 on S3, `latest` still step 2), then the same command."""
    from fault_proxy import fault_proxy

    work = str(tmp_path_factory.mktemp("s3ckpt"))
    bucket = f"ckpt-{os.getpid()}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    run_dir = os.path.join(work, "run")
    overrides = common_overrides(run_dir, s3_latents, mlflow_tracking_server.uri) + [
        "checkpoint.every=2", "checkpoint.keep_last=2", f"checkpoint.uri=s3://{bucket}/run"]
    proxy_log = os.path.join(work, "proxy.log")
    with fault_proxy(s3_server.endpoint_url, proxy_log, methods="PUT,POST,DELETE", path_prefix=f"/{bucket}",
                     delay=0.4) as proxy_url:
        env = {**env_for(s3_server), "AWS_ENDPOINT_URL": proxy_url}
        first = torchrun(overrides, env, work)
        deadline = time.monotonic() + 240
        while not (s3_latest(bucket, "run") == "step_000000002"
                   and any(k.startswith("run/step_000000004/") for k in s3_keys(bucket, "run/step_000000004"))):
            assert first.poll() is None, f"first run ended early ({first.returncode}); log: {first.log_path}"
            assert time.monotonic() < deadline, "step 4 never started uploading"
            time.sleep(0.05)
        kill_launch(first)
        killed = dict(latest=s3_latest(bucket, "run"), partial=s3_keys(bucket, "run/step_000000004"))
        finish(torchrun(overrides, env, work))
    with open(proxy_log) as f:
        faults = [line.split()[1] for line in f if line.startswith("FAULT")]
    return run_dir, bucket, killed, faults


def test_s3_checkpoints_survive_faults_and_a_kill_mid_upload(straight_run, s3_checkpointed_run):
    run_dir, bucket, killed, faults = s3_checkpointed_run
    assert killed["latest"] == "step_000000002" and killed["partial"], killed  # the kill came mid-upload
    assert {"reset", "503", "500"} <= set(faults), faults  # the proxy really cut uploads
    for rank in (0, 1):  # resumed from step 2 (the partial step 4 ignored): bitwise the uninterrupted run
        want, got = step_records(straight_run, rank), step_records(run_dir, rank)
        assert sorted(got) == list(range(1, STEPS + 1))
        for step in want:
            assert got[step]["keys"] == want[step]["keys"], f"rank {rank} step {step}: different samples"
            for k in ("loss", "mse", "vb"):
                assert got[step][k] == want[step][k], f"rank {rank} step {step}: {k} differs"
    assert s3_latest(bucket, "run") == "step_000000006"
    keys = s3_keys(bucket, "run/")
    # keep_last=2, the partial step 4 of the killed run replaced by the resumed run's, the run lock released
    assert sorted({k.split("/")[1] for k in keys}) == ["latest", "step_000000004", "step_000000006"]
    step6 = {k.split("/", 2)[2] for k in keys if k.startswith("run/step_000000006/")}
    assert {"ema.safetensors", "trainer.json", "rank_00000.pt", "rank_00001.pt"} <= step6
    assert sum(n.startswith("engine/zero_pp_rank_") for n in step6) == 4  # 2 ranks x (optim + model states)
    # what S3 holds is what was staged locally (the last one is kept there), byte for byte
    staged = os.path.join(run_dir, "checkpoints", "step_000000006")
    body = boto3.client("s3").get_object(Bucket=bucket, Key="run/step_000000006/ema.safetensors")["Body"].read()
    assert body == open(os.path.join(staged, "ema.safetensors"), "rb").read()
    assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == ["step_000000006"]


def test_s3_checkpoint_resumes_the_uninterrupted_ema(straight_run, s3_checkpointed_run, tmp_path):
    """The EMA downloaded from S3 after the resume equals the uninterrupted run's (local) EMA at step 6."""
    from safetensors.torch import load_file

    _, bucket, _, _ = s3_checkpointed_run
    local = tmp_path / "ema.safetensors"
    boto3.client("s3").download_file(bucket, "run/step_000000006/ema.safetensors", str(local))
    want = load_file(os.path.join(straight_run, "checkpoints", f"step_{STEPS:09d}", "ema.safetensors"))
    got = load_file(str(local))
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_a_failed_upload_on_one_rank_stops_every_rank_with_its_cause(tmp_path, s3_server, s3_latents):
    """S3 refuses rank 1's file of the step-2 checkpoint (403, not retried by botocore): both ranks stop promptly
    with one message naming rank 1 and the cause, exit status 3, and `latest` never names the failed save."""
    from fault_proxy import fault_proxy

    bucket = f"ckpt-fail-{os.getpid()}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    run_dir = str(tmp_path / "run")
    overrides = [f"run.dir={run_dir}", f"data.path={s3_latents}", "data.global_batch_size=4",
                 "data.micro_batch_size=2", "steps=100000", "checkpoint.every=2", f"checkpoint.uri=s3://{bucket}/run",
                 "checkpoint.upload_retries=1", "tracking.sample_every=0", "tracking.log_every=1",
                 f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"]
    with fault_proxy(s3_server.endpoint_url, str(tmp_path / "proxy.log"), methods="NONE",
                     deny="step_000000002/rank_00001.pt") as proxy_url:
        proc = torchrun(overrides, {**env_for(s3_server), "AWS_ENDPOINT_URL": proxy_url}, str(tmp_path))
        try:
            rc = proc.wait(timeout=240)
        except subprocess.TimeoutExpired:
            kill_launch(proc)
            raise
    log = open(proc.log_path).read()
    assert rc != 0, log[-3000:]
    messages = [line for line in log.splitlines() if line.startswith("dig train: checkpoint step_000000002 failed")]
    assert messages, log[-5000:]  # one line per rank that got to print before torchrun tore the launch down
    for m in messages:
        assert "rank 1 on" in m and "access denied" in m.lower() and "rank 0 on" not in m, m
    assert s3_latest(bucket, "run") is None
