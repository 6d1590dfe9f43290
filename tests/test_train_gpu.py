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


@pytest.mark.gpu
@pytest.mark.slow
def test_bf16_training_logs_mfu_and_memory(tmp_path):
    from mlflow import MlflowClient

    write_synthetic_dataset(str(tmp_path / "latents"), num_shards=2, samples_per_shard=16)
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "DS_ACCELERATOR")}
    env.update(TORCH_EXTENSIONS_DIR=os.path.join(REPO, ".torch_extensions"), PYTHONPATH=REPO)
    cmd = [sys.executable, "-m", "dig.cli", "train", "--config", TINY, "run.dir=run", f"data.path={tmp_path}/latents",
           "engine.precision=auto", "steps=6", "tracking.log_every=3", "tracking.sample_every=6"]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    run_id = json.load(open(tmp_path / "run" / "tracking.json"))["run_id"]
    metrics = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db").get_run(run_id).data.metrics
    assert 0 < metrics["mfu"] < 1 and metrics["gpu_mem_max_gib"] > 0
    assert math.isfinite(metrics["loss"])
