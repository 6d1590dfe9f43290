"""`make demo`: the whole job on this machine with embedded defaults, nothing downloaded.

  1. a small class-labelled image set, drawn here (coloured discs, squares, stripes, rings)
  2. the real Ray pipeline (`launch.preprocess`, a local Ray head on 127.0.0.1) → latent shards in <out>/latents
  3. `dig train` of a small DiG through `launch.train` (torchrun, one process, on whatever device exists)
     → checkpoints in <out>/run, metrics and sample grids in the local MLflow store
  4. `dig export` of the last checkpoint (EMA weights) → <out>/export, `dig sample` from it → <out>/samples.png,
     also attached to the MLflow run

The VAE is the real stabilityai/sd-vae-ft-ema when it is in the local Hugging Face cache; otherwise a small
random-weight VAE built from a config (the pipeline runs the same, but the pictures mean nothing).

    python -m launch.demo [--out demo_out] [--quick] [--steps N] [--vae SPEC]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass

import numpy as np

CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_CONFIG = os.path.join(CHECKOUT, "configs", "train", "tiny-cpu.yaml")
CLASSES = ("red_disc", "green_square", "blue_stripes", "yellow_ring")
RESOLUTION = 64
FALLBACK_VAE = "config:tiny"
# Settings that would send the demo elsewhere than this machine.
CLUSTER_VARS = ("RAY_ADDRESS", "HOSTFILE", "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "GPUS_PER_NODE")


@dataclass
class DemoSize:
    images_per_class: int
    shard_size: int
    steps: int
    checkpoint_every: int
    sample_every: int
    sample_steps: int     # diffusion steps for the grids


FULL = DemoSize(images_per_class=24, shard_size=16, steps=200, checkpoint_every=100, sample_every=100,
                sample_steps=25)
# The test-suite variant: no grids during training (the final grid still comes from the checkpoint).
QUICK = DemoSize(images_per_class=3, shard_size=6, steps=4, checkpoint_every=2, sample_every=0, sample_steps=4)


def say(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def loud(lines: list[str]) -> None:
    bar = "!" * 100
    print("\n".join([bar, *(f"!!  {line}" for line in lines), bar]), flush=True)


# --- 1. images -------------------------------------------------------------------------------------------------

def draw(cls: str, rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """One RGB image of class `cls`: its shape and colour on a noisy background, at a random place and size."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    image = rng.normal(40, 12, (height, width, 3)).clip(0, 255)
    cy, cx = rng.uniform(0.35, 0.65) * height, rng.uniform(0.35, 0.65) * width
    r = rng.uniform(0.18, 0.32) * min(height, width)
    jitter = rng.uniform(-30, 30, 3)
    if cls == "red_disc":
        mask, colour = (yy - cy) ** 2 + (xx - cx) ** 2 <= r ** 2, (220, 40, 40)
    elif cls == "green_square":
        mask, colour = (abs(yy - cy) <= r) & (abs(xx - cx) <= r), (40, 200, 60)
    elif cls == "blue_stripes":
        period = rng.uniform(6, 12)
        mask, colour = ((xx + yy * rng.uniform(-0.5, 0.5)) // period) % 2 == 0, (50, 80, 230)
    elif cls == "yellow_ring":
        d = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
        mask, colour = (d <= r) & (d >= 0.6 * r), (230, 210, 40)
    else:
        raise ValueError(f"unknown demo class {cls!r}")
    image[mask] = np.clip(np.array(colour) + jitter, 0, 255)
    return image.astype(np.uint8)


def make_images(root: str, images_per_class: int, seed: int = 0) -> int:
    """An ImageFolder tree root/<class>/<i>.{png,jpg}, sizes around RESOLUTION so the centre crop has work."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    count = 0
    for cls in CLASSES:
        os.makedirs(os.path.join(root, cls), exist_ok=True)
        for i in range(images_per_class):
            h, w = int(rng.integers(RESOLUTION, RESOLUTION + 24)), int(rng.integers(RESOLUTION, RESOLUTION + 40))
            image = Image.fromarray(draw(cls, rng, h, w))
            if i % 2:
                image.save(os.path.join(root, cls, f"{i:04d}.jpg"), quality=95)
            else:
                image.save(os.path.join(root, cls, f"{i:04d}.png"))
            count += 1
    return count


# --- 2. VAE ----------------------------------------------------------------------------------------------------

def choose_vae(requested: str | None) -> str:
    """The VAE spec to use: `requested`, else sd-vae-ft-ema if it loads from the local cache, else the tiny one."""
    from dig.vae import SD_VAE_ID, load_vae

    if requested:
        return requested
    os.environ["HF_HUB_OFFLINE"] = "1"  # fail at once instead of retrying a network that is not there
    try:
        load_vae(SD_VAE_ID)
        say(f"VAE: {SD_VAE_ID} (found in the local Hugging Face cache)")
        return SD_VAE_ID
    except Exception as exc:  # noqa: BLE001 - any failure means "not available here"; said below
        reason = str(exc).splitlines()[0][:200]
    loud([f"{SD_VAE_ID} is NOT in the local Hugging Face cache ({reason})",
          f"FALLING BACK to {FALLBACK_VAE!r}: a small VAE built from a config with RANDOM weights.",
          "The pipeline, training and sampling all run for real, but the sample grid shows noise-like images.",
          f"For real pictures, download {SD_VAE_ID} once (huggingface-cli download {SD_VAE_ID}) and rerun."])
    return FALLBACK_VAE


# --- 3-4. pipeline, training, sampling -------------------------------------------------------------------------

def run_pipeline(images: str, latents: str, vae: str, size: DemoSize) -> None:
    from launch.preprocess import plan_job
    from launch.preprocess import run as run_job

    plan = plan_job(["--vae", vae, "--resolution", str(RESOLUTION), "--shard-size", str(size.shard_size),
                     "--encode-batch-size", "16", "--num-encoders", "1"], images, latents)
    rc = run_job(plan, num_cpus=os.cpu_count() or 2, object_store_mb=300)
    if rc != 0:
        raise SystemExit(f"[demo] the Ray preprocessing job failed (exit {rc}); its log is above")


def train_overrides(latents: str, run_dir: str, size: DemoSize, steps: int) -> list[str]:
    return [f"data.path={latents}", f"data.resolution={RESOLUTION}", f"run.dir={run_dir}", "run.name=demo",
            f"model.num_classes={len(CLASSES)}", f"steps={steps}", f"checkpoint.every={size.checkpoint_every}",
            "tracking.experiment=dig-demo", f"tracking.log_every={min(10, steps)}",
            f"tracking.sample_every={size.sample_every}", f"tracking.sample.num_steps={size.sample_steps}",
            f"tracking.sample.num_images={len(CLASSES) * 2}"]


def run_training(overrides: list[str]) -> None:
    from launch.train import plan_launch
    from launch.train import run as run_launch

    os.environ["GPUS_PER_NODE"] = "1"  # one process: the tiny config's batch (8 = 2 x 4) fits no more ranks
    rc = run_launch(plan_launch(TRAIN_CONFIG, overrides))
    if rc != 0:
        raise SystemExit(f"[demo] training failed (exit {rc}); its log is above")


def export_and_sample(run_dir: str, export_dir: str, grid: str, size: DemoSize) -> None:
    """`dig export` then `dig sample`, through the CLI's own entry point (in this process: torch and the VAE
    code are already imported here)."""
    from dig.cli import main as dig

    if dig(["export", run_dir, "--out", export_dir]) != 0:
        raise SystemExit("[demo] `dig export` failed; its log is above")
    if dig(["sample", export_dir, "--out", grid, "--num-images", "16", "--sampling-steps", str(size.sample_steps),
            "--method", "ddim", "--cfg-scale", "4.0"]) != 0:
        raise SystemExit("[demo] `dig sample` failed; its log is above")


def attach_to_mlflow(run_dir: str, grid: str) -> tuple[str, str, str]:
    """Add the final grid to the training's MLflow run; returns (tracking uri, experiment id, run id)."""
    from mlflow.tracking import MlflowClient

    with open(os.path.join(run_dir, "tracking.json")) as f:
        tracking = json.load(f)
    client = MlflowClient(tracking_uri=tracking["uri"])
    client.log_artifact(tracking["run_id"], grid, artifact_path="demo")
    client.set_tag(tracking["run_id"], "demo.grid", os.path.abspath(grid))
    return tracking["uri"], tracking["experiment_id"], tracking["run_id"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo_out", help="folder for images, latents, run, export, samples.png")
    parser.add_argument("--quick", action="store_true", help="a shortened variant (tests): fewer images/steps")
    parser.add_argument("--steps", type=int, help="training steps (default 200; 4 with --quick)")
    parser.add_argument("--vae", help="VAE spec (default: sd-vae-ft-ema if cached locally, else config:tiny)")
    args = parser.parse_args(argv)
    size = QUICK if args.quick else FULL
    steps = args.steps or size.steps
    start = time.monotonic()
    for name in CLUSTER_VARS:
        if os.environ.pop(name, None) is not None:
            say(f"ignoring {name}: the demo runs on this machine only")

    out = os.path.abspath(args.out)
    images, latents, run_dir, export_dir = (os.path.join(out, d) for d in ("images", "latents", "run", "export"))
    grid = os.path.join(out, "samples.png")
    for stale in (images, latents, run_dir, export_dir):
        shutil.rmtree(stale, ignore_errors=True)  # a fresh run each time (MLflow keeps earlier ones)
    if os.path.exists(grid):
        os.unlink(grid)

    vae = choose_vae(args.vae)
    n = make_images(images, size.images_per_class)
    say(f"1/4 made {n} images of {len(CLASSES)} classes in {images}")
    say("2/4 Ray pipeline: images -> VAE latents -> webdataset shards (local Ray head on 127.0.0.1)")
    run_pipeline(images, latents, vae, size)
    say(f"3/4 training a small DiG for {steps} steps (dig train via launch.train)")
    run_training(train_overrides(latents, run_dir, size, steps))
    say("4/4 exporting the last checkpoint's EMA weights (dig export) and sampling a grid (dig sample)")
    export_and_sample(run_dir, export_dir, grid, size)
    uri, experiment_id, run_id = attach_to_mlflow(run_dir, grid)

    from dig.train.checkpoint import latest_checkpoint
    from dig.train.tracking import UI_VIEW

    minutes = (time.monotonic() - start) / 60
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + os.path.abspath(uri[len("sqlite:///"):])
    print(f"""
[demo] done in {minutes:.1f} min.
  sample grid : {grid}
  checkpoint  : {latest_checkpoint(run_dir)}
  MLflow run  : {run_id} (experiment dig-demo) in {uri}
  open the UI : make mlflow-ui   then http://127.0.0.1:5000/#/experiments/{experiment_id}/runs/{run_id}{UI_VIEW}
                (set MLFLOW_TRACKING_URI={uri} first if you run it from another directory)""", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
