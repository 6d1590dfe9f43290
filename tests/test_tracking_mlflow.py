"""MLflow as a training user sees it: a real `mlflow server` on 127.0.0.1, two short `dig train` runs in one
experiment, read back through MLflow's client (what the UI shows): the experiment's kind, run names, the
effective config as params and files, the DeepSpeed JSON, system metrics, step-keyed labelled sample grids,
and the final EMA model with its config."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from dig.data.synthetic import write_synthetic_dataset
from mlflow_server import mlflow_tracking_server  # noqa: F401 - fixture

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "train", "tiny-cpu.yaml")


def dig_train(cwd, uri: str, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": os.path.join(REPO, ".torch_extensions"), "DS_ACCELERATOR": "cpu",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO, "DIG_PROGRESS": "lines"}
    for k in ("MLFLOW_TRACKING_URI", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
              "DIG_GLA_DOTS_16BIT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "dig.cli", "train", "--config", TINY, f"tracking.uri={uri}",
           "tracking.experiment=ux", "data.global_batch_size=4", "data.micro_batch_size=4", *overrides]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_a_training_run_as_the_mlflow_ui_shows_it(tmp_path, mlflow_tracking_server):  # noqa: F811
    from mlflow import MlflowClient
    from PIL import Image

    from dig.train import checkpoint
    from dig.train.config import TrainConfig, flatten
    from dig.train.export import load_exported

    write_synthetic_dataset(str(tmp_path / "latents"), num_shards=2, samples_per_shard=8, num_classes=4)
    data = f"data.path={tmp_path / 'latents'}"
    first = dig_train(tmp_path, mlflow_tracking_server.uri, data, "run.dir=run1", "steps=4", "tracking.log_every=2",
                      "tracking.sample_every=2", "tracking.sample.num_images=8", "tracking.sample.num_steps=2",
                      "tracking.system_metrics_interval=1", "checkpoint.every=4", "model.num_classes=4")
    assert first.returncode == 0, first.stderr[-4000:]
    second = dig_train(tmp_path, mlflow_tracking_server.uri, data, "run.dir=run2", "steps=1",
                       "tracking.sample_every=0", "tracking.log_model=false", "model.num_classes=4")
    assert second.returncode == 0, second.stderr[-4000:]

    # The console: a start line, one progress line per log interval with step N/total and the rate, a summary.
    out = first.stdout + first.stderr
    assert re.search(r"\[dig train\] DiG-S/2: [\d.]+M params \| world size 1 \(cpu, fp32, ZeRO-3\) \| global batch 4",
                     out), out[-3000:]
    assert len(re.findall(r"\[dig train\] step: +\d+% [24]/4 \[[\d:]+<[\d:]+, .*loss=", out)) == 2, out[-3000:]
    # ... and the run's page in the UI, opened on the model-training view
    link = re.search(r"MLflow run (tiny-cpu-\S+) \((\w+)\) (http://\S+)", out)
    tracking = json.load(open(tmp_path / "run1" / "tracking.json"))
    run_id = tracking["run_id"]
    assert link.group(2) == run_id and link.group(3) == (
        f"{mlflow_tracking_server.uri}/#/experiments/{tracking['experiment_id']}/runs/{run_id}"
        "?workflowType=machine_learning")
    assert re.search(r"\[dig train\] finished at step 4/4: 4 steps in \d+m\d\ds, .* img/s", out)
    assert "FutureWarning" not in out and "should be kept in float32: []" not in out

    client = MlflowClient(tracking_uri=mlflow_tracking_server.uri)
    experiment = client.get_experiment_by_name("ux")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI opens on runs
    runs = {r.info.run_id: r for r in client.search_runs([experiment.experiment_id])}
    run = runs[run_id]
    names = [r.info.run_name for r in runs.values()]
    assert len(runs) == 2 and len(set(names)) == 2 and all(re.fullmatch(r"tiny-cpu-\d{8}-\d{6}-[0-9a-f]{4}", n)
                                                           for n in names)
    assert run.info.status == "FINISHED" and run.data.tags["dig.run.name"] == "tiny-cpu"
    assert run.data.tags["dig.gla_dots_16bit"] == "mixed"  # the GLA kernels' dots mode (DIG_GLA_DOTS_16BIT unset)
    assert run.info.run_name == link.group(1)

    # Params: every key of the schema, with its default where the user wrote none (the YAML has no optim.betas,
    # weight_decay, grad_clip, data.latent_norm, model.learn_sigma).
    params = run.data.params
    leaf_keys = set(flatten(TrainConfig.model_validate({"data": {"path": "x", "resolution": 64}}).model_dump()))
    missing = [k for k in leaf_keys if k not in params and not any(p.startswith(k + ".") for p in params)]
    assert not missing, missing  # (model.overrides is a dict: logged as model.overrides.depth, ...)
    assert (params["optim.weight_decay"], params["optim.betas"], params["optim.grad_clip"]) == ("0.0", "[0.9, 0.999]",
                                                                                                "1.0")
    assert params["data.latent_norm"] == "scaling_factor" and params["model.learn_sigma"] == "True"

    # The configuration files, and the DeepSpeed JSON the engine was built with.
    folder = tmp_path / "artifacts"
    client.download_artifacts(run_id, "config", str(folder))
    effective = yaml.safe_load((folder / "config" / "effective.yaml").read_text())
    user = yaml.safe_load((folder / "config" / "user.yaml").read_text())
    assert effective["optim"]["weight_decay"] == 0.0 and "weight_decay" not in user["optim"]
    assert effective["steps"] == 4 and user["steps"] == 4
    ds = json.loads((folder / "config" / "deepspeed.json").read_text())
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == \
        (4, 4, 1)
    assert ds["zero_optimization"]["stage"] == 3 and ds["optimizer"]["params"]["lr"] == pytest.approx(1e-3)
    assert ds["gradient_clipping"] == 1.0

    # Training metrics at the logging steps, and MLflow's own system metrics (CPU, memory, network).
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [2, 4]
    system = {k for k in run.data.metrics if k.startswith("system/")}
    for key in ("system/cpu_utilization_percentage", "system/system_memory_usage_megabytes",
                "system/network_receive_megabytes"):
        assert key in system, sorted(system)

    # Sample grids as the step-keyed image "samples" (the UI's image view): steps 2 and 4, a full 2x4 grid of
    # 64 px samples, each with a caption strip under it.
    images = [a.path for a in client.list_artifacts(run_id, "images")]
    full = sorted(p for p in images if p.endswith(".png"))
    assert [int(re.search(r"samples\+step\+(\d+)\+", p).group(1)) for p in full] == [2, 4], images
    grid = Image.open(client.download_artifacts(run_id, full[-1], str(tmp_path / "img")))
    assert grid.size[0] == 4 * 64 and 2 * 64 < grid.size[1] <= 2 * (64 + 24)
    strip = np.asarray(grid.convert("L"))[64:grid.size[1] // 2]
    assert strip.mean() < 80 and strip.max() > 200  # white caption text on a black strip

    # The final EMA model with its config, equal to the EMA weights of the last checkpoint.
    model_dir = client.download_artifacts(run_id, "model", str(tmp_path / "model"))
    model, info = load_exported(model_dir)
    assert info["step"] == 4 and info["classes"] == [f"class_{i:03d}" for i in range(4)]
    ema = checkpoint.load_ema_full(checkpoint.latest_checkpoint(str(tmp_path / "run1")))
    for name, value in model.state_dict().items():
        assert torch.equal(value, ema[name].float()), name
    assert run.data.tags["model.artifact"] == "model"
    assert not [a for a in client.list_artifacts(runs[next(r for r in runs if r != run_id)].info.run_id)
                if a.path == "model"]  # tracking.log_model=false
