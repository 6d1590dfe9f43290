"""`make demo`: its shortened variant end to end (real local Ray, real torchrun + DeepSpeed on CPU, real MLflow
sqlite store), the image set it draws, and how it picks the VAE."""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from launch import demo  # noqa: E402

DROP = ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "HOSTFILE", "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT",
        "GPUS_PER_NODE", "HF_HUB_OFFLINE")


def demo_env(tmp_path, **extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in DROP}
    env.update(PYTHONPATH=REPO, HF_HOME=str(tmp_path / "hf"),
               TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", os.path.join(REPO, ".torch_extensions")))
    env.update(extra)
    return env


@pytest.mark.slow
def test_quick_demo_makes_a_grid_a_checkpoint_and_an_mlflow_run(tmp_path):
    from mlflow.tracking import MlflowClient
    from PIL import Image

    from ray_cluster import processes_in_group

    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "launch.demo", "--quick", "--out", str(out)], cwd=tmp_path,
                          env=demo_env(tmp_path), capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]

    # No sd-vae-ft-ema in the (empty) cache: the fallback is announced loudly.
    assert "FALLING BACK to 'config:tiny'" in proc.stdout
    # The local Ray head is gone, all of its process group.
    pid = int(re.search(r"local Ray head \(pid (\d+)\) stopped", log).group(1))
    assert not [p for p in processes_in_group(pid) if "<defunct>" not in p]

    # Every drawn image went through the Ray pipeline into the shards, under its class.
    images = sorted(os.path.relpath(os.path.join(d, f), out / "images")
                    for d, _, files in os.walk(out / "images") for f in files)
    assert len(images) == len(demo.CLASSES) * demo.QUICK.images_per_class
    manifest = json.loads((out / "latents" / "manifest.json").read_text())
    assert sorted(k for shard in manifest["shards"] for k in shard["keys"]) == images
    assert manifest["classes"] == sorted(demo.CLASSES) and manifest["vae"] == "config:tiny"

    # Training reached its last step and checkpointed it; the grid is 16 samples of 64x64 in a square tiling.
    assert (out / "run" / "checkpoints" / f"step_{demo.QUICK.steps:09d}").is_dir()
    grid = Image.open(out / "samples.png")
    side = math.ceil(math.sqrt(16)) * demo.RESOLUTION
    assert grid.size == (side, side) and grid.mode == "RGB"
    assert np.asarray(grid).std() > 0

    # One MLflow run in the local default store (sqlite:///mlflow.db in the working directory) holds it all.
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("dig-demo")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.params["steps"] == str(demo.QUICK.steps)
    losses = client.get_metric_history(run.info.run_id, "loss")
    assert losses and all(math.isfinite(m.value) for m in losses)
    assert [a.path for a in client.list_artifacts(run.info.run_id, "demo")] == ["demo/samples.png"]
    fetched = client.download_artifacts(run.info.run_id, "demo/samples.png", str(tmp_path))
    assert open(fetched, "rb").read() == (out / "samples.png").read_bytes()

    # It ends by saying where the grid is and how to open the UI.
    tail = proc.stdout[proc.stdout.rindex("[demo] done"):]
    assert str(out / "samples.png") in tail and "make mlflow-ui" in tail and run.info.run_id in tail


def test_demo_images_show_their_class(tmp_path):
    """Each class's images carry its colour: the bright pixels' mean colour identifies the class."""
    from PIL import Image

    n = demo.make_images(str(tmp_path), images_per_class=4, seed=3)
    assert n == 4 * len(demo.CLASSES)
    expected = {"red_disc": (1, 0, 0), "green_square": (0, 1, 0), "blue_stripes": (0, 0, 1),
                "yellow_ring": (1, 1, 0)}
    for cls in demo.CLASSES:
        files = sorted(os.listdir(tmp_path / cls))
        assert len(files) == 4
        for f in files:
            rgb = np.asarray(Image.open(tmp_path / cls / f).convert("RGB")).astype(float)
            assert min(rgb.shape[:2]) >= demo.RESOLUTION  # the pipeline's min side and crop have room
            bright = rgb[rgb.max(-1) > 150]
            assert len(bright) > 0.02 * rgb.shape[0] * rgb.shape[1], (cls, f)
            strong = tuple(int(c > 150) for c in bright.mean(0))
            assert strong == expected[cls], (cls, f, bright.mean(0))


def _choose_vae_in_subprocess(tmp_path, hf_home):
    code = "from launch.demo import choose_vae; print('CHOSEN', choose_vae(None))"
    proc = subprocess.run([sys.executable, "-c", code], env=demo_env(tmp_path, HF_HOME=str(hf_home)),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.rsplit("CHOSEN ", 1)[1].strip(), proc.stdout


@pytest.mark.slow
def test_demo_uses_sd_vae_when_cached_and_falls_back_loudly(tmp_path):
    from dig.vae import SD_VAE_ID, build_vae_from_config

    chosen, out = _choose_vae_in_subprocess(tmp_path, tmp_path / "empty")
    assert chosen == "config:tiny" and "FALLING BACK" in out

    # A Hugging Face hub cache holding a model under the sd-vae-ft-ema id (here the tiny architecture: the demo
    # only needs to find and load it offline).
    hub = tmp_path / "hf" / "hub" / ("models--" + SD_VAE_ID.replace("/", "--"))
    revision = "0123456789abcdef0123456789abcdef01234567"
    build_vae_from_config("tiny").save_pretrained(hub / "snapshots" / revision)
    (hub / "refs").mkdir(parents=True)
    (hub / "refs" / "main").write_text(revision)
    chosen, out = _choose_vae_in_subprocess(tmp_path, tmp_path / "hf")
    assert chosen == SD_VAE_ID and "FALLING BACK" not in out
