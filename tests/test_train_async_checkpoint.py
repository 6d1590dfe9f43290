"""Background checkpoints hold the state of the step they were taken at, value for value what DeepSpeed's own
writer produces, although training goes on while they are written (see tests/checkpoint_probe.py). The 2-rank
kill-mid-upload and failure tests are in tests/test_train.py; the run lock's in tests/test_run_lock.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_background_save_equals_deepspeeds_own_writer(tmp_path, stage):
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": os.path.join(REPO, ".torch_extensions"), "DS_ACCELERATOR": "cpu",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    for k in ("MLFLOW_TRACKING_URI", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    done = subprocess.run([sys.executable, os.path.join(REPO, "tests", "checkpoint_probe.py"), str(stage),
                           str(tmp_path)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "PROBE OK" in done.stdout, (done.stdout + done.stderr)[-4000:]


def test_checkpoint_uri_folder_outside_the_run_dir(tmp_path):
    """checkpoint.uri=<folder>: checkpoints and `latest` live there (nothing under run.dir/checkpoints), a second
    launch resumes from it, and `dig export` takes the folder."""
    from dig.data.synthetic import write_synthetic_dataset
    from dig.train.export import export

    write_synthetic_dataset(str(tmp_path / "latents"), num_shards=2, samples_per_shard=8)
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": os.path.join(REPO, ".torch_extensions"), "DS_ACCELERATOR": "cpu",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    for k in ("MLFLOW_TRACKING_URI", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    ckpts = tmp_path / "shared" / "ckpts"

    def train(steps: int) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "dig.cli", "train", "--config", os.path.join(REPO, "configs/train/tiny-cpu.yaml"),
               "run.dir=run", f"data.path={tmp_path / 'latents'}", "tracking.sample_every=0", "checkpoint.every=1",
               "checkpoint.keep_last=1", f"checkpoint.uri={ckpts}", "data.global_batch_size=4",
               "data.micro_batch_size=4", f"steps={steps}"]
        return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)

    first = train(2)
    assert first.returncode == 0, first.stderr[-3000:]
    assert sorted(os.listdir(ckpts)) == ["latest", "step_000000002"]
    assert not (tmp_path / "run" / "checkpoints").exists() or not os.listdir(tmp_path / "run" / "checkpoints")
    second = train(3)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"resumed from {ckpts / 'step_000000002'} at step 2" in second.stderr
    assert (ckpts / "latest").read_text() == "step_000000003"
    out = export(str(ckpts), str(tmp_path / "export"))
    assert json.load(open(os.path.join(out, "config.json")))["step"] == 3
