"""Latent pipeline throughput against the bare encoder, same machine, same VAE, same batch.

  bare encoder  LatentEncoder.encode_images on already-cropped uint8 images in memory (host->device copy,
                normalise, VAE encode of image + flip, cast to the storage dtype, copy back): the ceiling.
  pipeline      python -m data_pipeline's job on a local Ray (or RAY_ADDRESS) over an ImageFolder of JPEGs:
                list, read, decode, ADM crop, encode, write tar shards + done records + manifest.
Both count input images per second (each image is encoded twice: as is and mirrored).

  .venv/bin/python bench/bench_pipeline.py --vae config:sd --resolution 256 --images 64 --batch 16
Synthetic ImageNet-like JPEGs (random sizes around 500x375) are generated unless --input is given; random VAE
weights are fine for speed ("config:sd" is the sd-vae-ft-ema architecture).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import warnings

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_pipeline.config import PipelineConfig  # noqa: E402
from data_pipeline.encoder import LatentEncoder  # noqa: E402


def make_jpeg_folder(root: str, count: int, classes: int = 4, seed: int = 0) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(count):
        w, h = int(rng.integers(400, 600)), int(rng.integers(300, 450))
        # Smooth random colour fields compress like photos (pure noise would make huge JPEGs).
        small = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize((w, h), Image.BICUBIC)
        folder = os.path.join(root, f"class{i % classes:03d}")
        os.makedirs(folder, exist_ok=True)
        image.save(os.path.join(folder, f"img{i:06d}.JPEG"), quality=90)


def bench_encoder(args) -> dict:
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        encoder = LatentEncoder(args.vae, precision=args.precision, device=args.device, batch_size=args.batch)
    images = np.random.default_rng(0).integers(0, 256, (args.images, args.resolution, args.resolution, 3),
                                               dtype=np.uint8)
    encoder.encode_images(images[: args.batch])  # warm-up (allocator, cuDNN autotune)
    if encoder.device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    encoder.encode_images(images)  # returns host arrays: includes the device->host copy
    seconds = time.perf_counter() - start
    return {"mode": "bare encoder", "device": encoder.device, "images": args.images,
            "seconds": round(seconds, 3), "images_per_s": round(args.images / seconds, 2)}


def bench_pipeline(args) -> dict:
    from data_pipeline.job import run

    work = tempfile.mkdtemp(prefix="bench-pipeline-")
    try:
        source = args.input
        if source is None:
            source = os.path.join(work, "images")
            make_jpeg_folder(source, args.images)
        cfg = PipelineConfig(input=source, output=os.path.join(work, "latents"), resolution=args.resolution,
                             vae=args.vae, shard_size=args.shard_size, precision=args.precision,
                             device=args.device, encode_batch_size=args.batch, num_encoders=args.num_encoders,
                             decode_cpus=args.decode_cpus)
        summary = run(cfg)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"mode": "pipeline", "images": summary["images_in"], "seconds": summary["seconds"],
            "images_per_s": summary["images_per_s"], "total_seconds": summary["total_seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vae", default="config:sd")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    parser.add_argument("--shard-size", type=int, default=32)
    parser.add_argument("--num-encoders", type=int, default=None)
    parser.add_argument("--decode-cpus", type=float, default=1.0)
    parser.add_argument("--input", default=None, help="an ImageFolder to use instead of synthetic JPEGs")
    parser.add_argument("--only", choices=["encoder", "pipeline"], default=None)
    args = parser.parse_args()

    import torch

    if args.device == "cpu" or (args.device == "auto" and not torch.cuda.is_available()):
        torch.set_num_threads(os.cpu_count())
    results = []
    if args.only in (None, "encoder"):
        results.append(bench_encoder(args))
    if args.only in (None, "pipeline"):
        results.append(bench_pipeline(args))
    setup = {k: getattr(args, k) for k in ("vae", "resolution", "batch", "precision", "device", "shard_size")}
    for r in results:
        print("[bench_pipeline] " + json.dumps({**setup, **r}), flush=True)
    if len(results) == 2:
        print(f"[bench_pipeline] pipeline / bare encoder = "
              f"{results[1]['images_per_s'] / results[0]['images_per_s']:.2f}", flush=True)


if __name__ == "__main__":
    main()
