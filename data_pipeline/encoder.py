"""The VAE encoder stage: a Ray Data actor that turns a shard's cropped images into posterior mean/std for the
image and its horizontal flip."""
from __future__ import annotations

import numpy as np

PRECISIONS = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but this worker sees no CUDA GPU")
    return device


class LatentEncoder:
    """Callable class for `Dataset.map_batches(..., batch_size=1)`: one row is one shard."""

    def __init__(self, vae: str, precision: str = "fp32", device: str = "auto", batch_size: int = 64,
                 storage_dtype: str = "float16"):
        import torch

        from dig.vae import load_vae

        self.device = resolve_device(device)
        if self.device == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick the fastest convolutions
        self.vae = load_vae(vae, device=self.device, dtype=getattr(torch, PRECISIONS[precision]))
        self.batch_size = batch_size
        self.storage_dtype = storage_dtype

    def encode_images(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 [N, H, W, 3] -> (mean, std), each [N, 2, C, h, w] in the storage dtype; [:, 1] is the flip."""
        import torch

        from dig.vae import encode

        means, stds = [], []
        for start in range(0, len(images), self.batch_size):
            # Ray hands over read-only arrays; torch warns about those, so copy only when not writable
            chunk = torch.from_numpy(np.require(images[start:start + self.batch_size], requirements=["C", "W"]))
            x = chunk.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float() / 127.5 - 1.0
            n = x.shape[0]
            mean, std = encode(self.vae, torch.cat([x, x.flip(-1)]))
            to_store = getattr(torch, self.storage_dtype)
            means.append(mean.float().unflatten(0, (2, n)).transpose(0, 1).to(to_store).cpu().numpy())
            stds.append(std.float().unflatten(0, (2, n)).transpose(0, 1).to(to_store).cpu().numpy())
        if not means:
            return np.zeros((0, 2, 0, 0, 0), self.storage_dtype), np.zeros((0, 2, 0, 0, 0), self.storage_dtype)
        return np.concatenate(means), np.concatenate(stds)

    def __call__(self, batch: dict) -> dict:
        out = {k: v for k, v in batch.items() if k != "images"}
        means, stds = zip(*(self.encode_images(np.asarray(images)) for images in batch["images"]))
        out["mean"] = _stack(means)
        out["std"] = _stack(stds)
        return out


def _stack(arrays) -> np.ndarray:
    """Rows of (possibly) different shapes as one column: a regular array when they agree, else objects."""
    if len({a.shape for a in arrays}) == 1:
        return np.stack(arrays)
    column = np.empty(len(arrays), dtype=object)
    column[:] = list(arrays)
    return column
