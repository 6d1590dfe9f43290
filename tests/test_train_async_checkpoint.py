"""Background checkpoints hold the state of the step they were taken at, value for value what DeepSpeed's own
writer produces, although training goes on while they are written (see tests/checkpoint_probe.py). The 2-rank
kill-mid-upload and failure tests are in tests/test_train.py; the run lock's in tests/test_run_lock.py."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("stage", [2, 3])
def test_background_save_equals_deepspeeds_own_writer(tmp_path, stage):
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": os.path.join(REPO, ".torch_extensions"), "DS_ACCELERATOR": "cpu",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    for k in ("MLFLOW_TRACKING_URI", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    done = subprocess.run([sys.executable, os.path.join(REPO, "tests", "checkpoint_probe.py"), str(stage),
                           str(tmp_path)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "PROBE OK" in done.stdout, (done.stdout + done.stderr)[-4000:]
