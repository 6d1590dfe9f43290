"""On a CUDA machine: one-process `dig train` in bf16 logs MFU and GPU memory and learns without NaNs."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from dig.data.synthetic import write_synthetic_dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "train", "tiny-cpu.yaml")


def child_env(**extra):
    """The environment of a child `dig train`: this one's, keeping its PYTHONPATH (the GPU machine's packages live
    there, not in the interpreter's site-packages) with the repository added, and no tracking server or forced
    accelerator from outside."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "DS_ACCELERATOR")}
    env.update(TORCH_EXTENSIONS_DIR=os.path.join(REPO, ".torch_extensions"),
               PYTHONPATH=os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), REPO) if p), **extra)
    return env


@pytest.mark.gpu
@pytest.mark.slow
def test_bf16_training_logs_mfu_and_memory(tmp_path):
    from mlflow import MlflowClient

    write_synthetic_dataset(str(tmp_path / "latents"), num_shards=2, samples_per_shard=16)
    env = child_env()
    cmd = [sys.executable, "-m", "dig.cli", "train", "--config", TINY, "run.dir=run", f"data.path={tmp_path}/latents",
           "engine.precision=auto", "steps=6", "tracking.log_every=3", "tracking.sample_every=6"]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    run_id = json.load(open(tmp_path / "run" / "tracking.json"))["run_id"]
    metrics = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db").get_run(run_id).data.metrics
    assert 0 < metrics["mfu"] < 1 and metrics["gpu_mem_max_gib"] > 0
    assert math.isfinite(metrics["loss"])


@pytest.mark.gpu
@pytest.mark.slow
def test_resume_on_another_gpu_count(tmp_path):
    """N GPUs (all visible, N >= 2) → N/2 → N, bf16 ZeRO-3 over NCCL, DiG-S/2 at 256 px: the engine state after each
    change equals the one before (DeepSpeed's own getters), every sample of epoch 0 is read once, the losses go on.
    No MLflow on the GPU machine: the probe runs without tracking."""
    import torch

    from test_train_reshard import PROBE, assert_same_engine_state, step_log

    n = torch.cuda.device_count()
    if n < 2:
        pytest.skip("needs 2 or more GPUs")
    half = n // 2
    samples, steps = 512, [5, 10, 17]   # epoch 0 = 16 steps of 32; the last run ends in epoch 1
    write_synthetic_dataset(str(tmp_path / "latents"), num_shards=8, samples_per_shard=samples // 8,
                            latent_size=32, channels=4, num_classes=1000)
    env = child_env(PROBE_DIR=str(tmp_path), PROBE_TRACKING="none", NCCL_NVLS_ENABLE="0",
                    TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")
    common = ["--config", TINY, f"run.dir={tmp_path}/run", f"data.path={tmp_path}/latents", "data.resolution=256",
              "model.num_classes=1000", "model.overrides.depth=4", "model.overrides.hidden_size=384",
              "model.overrides.num_heads=6", "engine.precision=auto", "engine.zero_stage=3",
              "data.global_batch_size=32", "data.micro_batch_size=8", "checkpoint.every=1000",
              "tracking.log_every=1", "tracking.sample_every=0", "tracking.step_log=true"]
    for world, last in zip((n, half, n), steps):
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}", "--master_addr=127.0.0.1",
               f"--master_port={29500 + world + last}", PROBE, *common, f"steps={last}"]
        done = subprocess.run(cmd, cwd=tmp_path, env={**env, "CUDA_VISIBLE_DEVICES": ",".join(map(str, range(world)))},
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-4000:]
    load = lambda name: torch.load(os.path.join(tmp_path, name), weights_only=False)  # noqa: E731
    assert_same_engine_state(load(f"final_step5_world{n}.pt"), load(f"resumed_step5_world{half}.pt"))
    assert_same_engine_state(load(f"final_step10_world{half}.pt"), load(f"resumed_step10_world{n}.pt"))
    records = step_log(str(tmp_path / "run"), n)
    epoch0 = [k for s in range(1, 17) for rec in records[s] for k in rec["keys"]]
    assert len(epoch0) == len(set(epoch0)) == samples
    losses = [records[s][0]["loss"] for s in sorted(records)]
    print("losses", [round(x, 4) for x in losses])
    assert all(math.isfinite(x) and x < 1.5 * losses[0] for x in losses), losses


# `dig train` with every EMA update on the side stream held back ~25 ms behind a sleep kernel: long enough that the
# next step's optimizer would overwrite the weights before the update reads them unless it waits for it
DELAYED_SIDE_STREAM = """
import runpy, sys, torch
import dig.train.ema as ema
update = ema.ShardedEMA.update
def delayed(self, *args, **kwargs):
    if self.stream is not None:
        with torch.cuda.stream(self.stream):
            torch.cuda._sleep(50_000_000)
    update(self, *args, **kwargs)
ema.ShardedEMA.update = delayed
sys.argv = ["dig.cli", *sys.argv[1:]]
runpy.run_module("dig.cli", run_name="__main__")
"""


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("engine", [["engine.zero_stage=0", "engine.precision=amp"],
                                    ["engine.zero_stage=3", "engine.precision=bf16"]], ids=["zero0-amp", "zero3-bf16"])
def test_ema_on_its_own_stream_gives_the_same_bits(tmp_path, engine):
    """ema_side_stream: the EMA update runs on a stream of its own beside the next forward; the optimizer waits for
    it before changing the weights, checkpoints before reading it. Compiled blocks with CUDA graphs, a DiG-S/2 big
    enough that an update takes a while, and every side-stream update held back behind a sleep: the EMA and the
    weights written at the end equal a run with the update on the main stream, bit for bit."""
    import torch
    from safetensors.torch import load_file

    write_synthetic_dataset(str(tmp_path / "latents"), num_shards=2, samples_per_shard=32, latent_size=32,
                            channels=4, num_classes=10)
    env = child_env()
    ema = {}
    for side in (False, True):
        run = tmp_path / f"side_{side}"
        cmd = [sys.executable, "-c", DELAYED_SIDE_STREAM, "train", "--config", TINY, f"run.dir={run}",
               f"data.path={tmp_path}/latents", "data.resolution=256", "model.overrides.depth=6",
               "model.overrides.hidden_size=384", "model.overrides.num_heads=6", *engine,
               "model.compile=true", "model.compile_mode=reduce-overhead",
               "data.global_batch_size=8", "data.micro_batch_size=8", "steps=8", "ema_decay=0.5",
               "checkpoint.every=4", "tracking.backend=none", "tracking.sample_every=0", f"ema_side_stream={side}"]
        done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-4000:]
        ema[side] = load_file(str(run / "checkpoints" / "step_000000008" / "ema.safetensors"))
    assert ema[True].keys() == ema[False].keys()
    differing = [k for k in ema[False] if not torch.equal(ema[False][k], ema[True][k])]
    assert not differing, differing
