"""engine.deepcompile on CPU, where DeepCompile itself cannot run: what the trainer hands DeepSpeed's
`engine.compile()` (the engine's step and the pass schedule), for a new run and for a resumed one. DeepSpeed
starts a schedule only when the engine's step equals its first entry (deepspeed/compile/backend.py,
launch_compile_passes), so a resumed run's schedule must start at the checkpoint's step."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from dig.data.synthetic import write_synthetic_dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "train", "tiny-cpu.yaml")

# `dig train` with DeepCompile's support check passed and engine.compile() recording its arguments instead of
# compiling (the CPU has no DeepCompile op)
RECORDING_COMPILE = """
import json
import deepspeed.compile.util
from deepspeed.runtime.engine import DeepSpeedEngine

deepspeed.compile.util.is_deepcompile_supported = lambda: True
handed = []
DeepSpeedEngine.compile = lambda self, backend, schedule=None, **kw: handed.append(
    {"engine_step": self.global_steps, "schedule_steps": [step for step, _ in schedule],
     "passes": [[p.__name__ for p in passes] for _, passes in schedule],
     "deepcompile": self.config["compile"]["deepcompile"]})
from dig.cli import main
try:
    main(__import__("sys").argv[1:])
finally:
    print("HANDED " + json.dumps(handed))
"""


def _train(tmp_path, *overrides) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(TORCH_EXTENSIONS_DIR=os.path.join(REPO, ".torch_extensions"),
               PYTHONPATH=os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), REPO) if p))
    cmd = [sys.executable, "-c", RECORDING_COMPILE, "train", "--config", TINY, f"run.dir={tmp_path}/run",
           f"data.path={tmp_path}/latents", "engine.zero_stage=3", "model.compile=false", "engine.deepcompile=true",
           "tracking.backend=none", "tracking.sample_every=0", "checkpoint.every=2", *overrides]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    line = [ln for ln in done.stdout.splitlines() if ln.startswith("HANDED ")][-1]
    return json.loads(line[len("HANDED "):])


def test_deepcompile_gets_the_model_after_a_resume_with_the_schedule_starting_at_its_step(tmp_path):
    from deepspeed.compile.init_z3 import WARMUP

    write_synthetic_dataset(str(tmp_path / "latents"), num_shards=2, samples_per_shard=16)
    fresh = _train(tmp_path, "steps=2")
    assert fresh == [{"engine_step": 0, "schedule_steps": [0, WARMUP], "deepcompile": True, "passes": [
        ["add_z3_gather_release"], ["add_z3_gather_release", "schedule_prefetch", "selective_gather"]]}]
    resumed = _train(tmp_path, "steps=4", "engine.deepcompile_prefetch=false")
    assert resumed == [{"engine_step": 2, "schedule_steps": [2], "deepcompile": True,
                        "passes": [["add_z3_gather_release"]]}]
