"""Distributed sampling to the ADM evaluator's `.npz` (`arr_0`: uint8 [N, H, W, 3]; `arr_1`: int64 labels).

Run under torchrun (one process per GPU; on CPU the processes talk over gloo) or as a single process. Sample i
depends only on (seed, i): its class label (uniform over the classes) and all of its noise come from its own
generator, so the N samples are the same for any number of processes and any batch size (up to the
floating-point summation order of different batch shapes).

Work is cut into chunks of `batch_size` consecutive indices; rank r takes chunks r, r + world, … and writes each
finished chunk atomically to `<out>.parts/`. An interrupted run started again with the same arguments (any
number of processes) skips the chunks on disk: no index is sampled twice or left out. When every chunk is
there, rank 0 streams them into `<out>` (written to a temporary name, then renamed) and removes the parts.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import zipfile

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

PLAN_FILE = "plan.json"


def sample_generator(seed: int, index: int, device) -> torch.Generator:
    """The noise generator of sample `index` (independent streams for different (seed, index))."""
    state = np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0]
    return torch.Generator(device=device).manual_seed(int(state))


def sample_label(seed: int, index: int, num_classes: int) -> int:
    """The class of sample `index`, uniform over the classes."""
    return int(np.random.default_rng([seed, index, 1]).integers(num_classes))


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[N, 3, H, W] in [-1, 1] → uint8 [N, H, W, 3], quantised as ADM's samplers do ((x + 1) * 127.5, truncated)."""
    pixels = ((images.float() + 1) * 127.5).clamp(0, 255).to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).contiguous().cpu().numpy()


@torch.no_grad()
def sample_images(model, vae, normalizer, latent_shape, indices: list[int], seed: int, num_classes: int,
                  num_steps: int, method: str, cfg_scale: float, device) -> tuple[np.ndarray, np.ndarray]:
    """Images (uint8 NHWC) and labels of the given sample indices; each depends on (seed, index) only."""
    from dig.diffusion import sample
    from dig.vae import decode

    labels = [sample_label(seed, i, num_classes) for i in indices]
    generators = [sample_generator(seed, i, device) for i in indices]
    latents = sample(model, labels, latent_shape, num_steps=num_steps, cfg_scale=cfg_scale, method=method,
                     generator=generators, device=device)
    images = decode(vae, normalizer.denormalize(latents.float()))
    return to_uint8(images), np.asarray(labels, dtype=np.int64)


def _chunk_path(parts: str, chunk: int) -> str:
    return os.path.join(parts, f"chunk_{chunk:07d}.npz")


def sample_to_npz(source: str, out: str, num_samples: int, batch_size: int = 32, num_steps: int = 250,
                  method: str = "ddpm", cfg_scale: float = 1.0, seed: int = 0, vae: str | None = None,
                  device: str | None = None, tf32: bool = True, progress: bool = True) -> str | None:
    """Sample `num_samples` images of the model at `source` (export folder or run directory) into `out`.
    Every process of a torchrun launch calls this; returns `out` on rank 0 (None elsewhere)."""
    from dig.inference.loading import load_model
    from dig.inference.normalizer import LatentNormalizer
    from dig.inference.progress import Progress
    from dig.vae import load_vae

    if num_samples < 1 or batch_size < 1:
        raise ValueError("num_samples and batch_size must be >= 1")
    if not out.endswith(".npz"):
        raise ValueError(f"--out must end in .npz for sample sets, got {out!r}")
    rank, world, dev = _init(device)
    try:
        if os.path.exists(out):
            raise FileExistsError(f"{out} already exists; remove it or choose another --out")
        if dev.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = tf32
            torch.backends.cudnn.allow_tf32 = tf32
        model, info = load_model(source, device=dev)
        normalizer = LatentNormalizer.from_dict(info["normalizer"])
        latent_shape = info["latent_shape"]
        vae_spec = vae or info["vae"]
        parts = out + ".parts"
        plan = {"source": os.path.abspath(source), "step": info.get("step"), "num_samples": num_samples,
                "chunk": batch_size, "seed": seed, "num_steps": num_steps, "method": method,
                "cfg_scale": cfg_scale, "vae": vae_spec, "latent_shape": latent_shape}
        num_chunks = -(-num_samples // batch_size)
        chunk_range = lambda c: range(c * batch_size, min((c + 1) * batch_size, num_samples))  # noqa: E731
        done = lambda: sum(len(chunk_range(c)) for c in range(num_chunks)  # noqa: E731
                           if os.path.exists(_chunk_path(parts, c)))
        already = 0
        if rank == 0:
            _check_or_write_plan(parts, plan)
            already = done()  # counted before the barrier: after it, the other ranks add chunks
        _barrier(world)
        if rank != 0:
            _check_or_write_plan(parts, plan)  # raises if rank 0 found a different plan (it raised too)
        vae_model = load_vae(vae_spec, device=dev)

        bar = Progress(num_samples, f"sampling {num_samples} images on {world} process(es)", initial=already,
                       enabled=progress and rank == 0)
        if rank == 0 and bar.n:
            log.info("resuming: %d of %d samples already in %s", bar.n, num_samples, parts)
        for c in range(rank, num_chunks, world):
            path = _chunk_path(parts, c)
            if os.path.exists(path):
                continue
            images, labels = sample_images(model, vae_model, normalizer, latent_shape, list(chunk_range(c)), seed,
                                           model.num_classes, num_steps, method, cfg_scale, dev)
            tmp = path + f".tmp{rank}.npz"
            np.savez(tmp, images=images, labels=labels)
            os.replace(tmp, path)
            if rank == 0:
                bar.update(done() - bar.n)
        _barrier(world)
        if rank == 0:
            bar.update(done() - bar.n)
            bar.close()
        if rank != 0:
            _barrier(world)
            return None
        missing = [c for c in range(num_chunks) if not os.path.exists(_chunk_path(parts, c))]
        if missing:
            raise RuntimeError(f"{len(missing)} chunks missing in {parts} after sampling (e.g. {missing[:5]}); "
                               "run the same command again to fill them")
        _assemble(parts, num_chunks, num_samples, out)
        shutil.rmtree(parts)
        _barrier(world)  # the others leave once the file is complete
        return out
    finally:  # no collective here: after an error on one rank torchrun ends the others
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _check_or_write_plan(parts: str, plan: dict) -> None:
    path = os.path.join(parts, PLAN_FILE)
    if os.path.exists(path):
        with open(path) as f:
            previous = json.load(f)
        changed = {k: (previous.get(k), v) for k, v in plan.items() if previous.get(k) != v}
        if changed:
            raise ValueError(f"{parts} holds an unfinished run with other settings (key: (then, now)): {changed}; "
                             "run with the same arguments to resume, or remove the folder to start over")
        return
    os.makedirs(parts, exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(plan, f, indent=1)
    os.replace(path + ".tmp", path)


def _assemble(parts: str, num_chunks: int, num_samples: int, out: str) -> None:
    """Stream the chunks into one .npz (never all images in memory at once: 50k 256² images are 9.8 GB)."""
    first = np.load(_chunk_path(parts, 0))["images"]
    shape = (num_samples, *first.shape[1:])
    labels = []
    tmp = out + ".tmp"
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        with zf.open("arr_0.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(
                f, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                    "shape": shape})
            for c in range(num_chunks):
                with np.load(_chunk_path(parts, c)) as chunk:
                    f.write(np.ascontiguousarray(chunk["images"]).tobytes())
                    labels.append(chunk["labels"])
        with zf.open("arr_1.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array(f, np.concatenate(labels))
    os.replace(tmp, out)


def _init(device: str | None) -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        dev = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    else:
        dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return rank, world, dev


def _barrier(world: int) -> None:
    if world > 1 and dist.is_initialized():
        dist.barrier()
