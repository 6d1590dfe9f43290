"""Stored (unscaled) VAE latents <-> the latents a model was trained on. Lives beside inference because sampling
needs its inverse; the training reader applies it forward."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

    from dig.data.shard_format import Manifest


class LatentNormalizer:
    """Stored (unscaled) latents ↔ training latents: `x * scaling_factor`, or per-channel `(x - mean) / std`."""

    def __init__(self, scale: np.ndarray, shift: np.ndarray, kind: str):
        self.scale = np.asarray(scale, np.float32).reshape(-1, 1, 1)
        self.shift = np.asarray(shift, np.float32).reshape(-1, 1, 1)
        self.kind = kind

    @classmethod
    def from_dataset(cls, root: str, manifest: Manifest, kind: str) -> "LatentNormalizer":
        from dig.data import storage
        from dig.errors import DatasetError, DatasetNotFound
        from dig.data.shard_format import STATS_NAME, LatentStats

        c = manifest.latent_channels
        if kind == "scaling_factor":
            return cls(np.full(c, manifest.scaling_factor), np.zeros(c), kind)
        if kind == "stats":
            uri = storage.join(root, STATS_NAME)
            if not storage.exists(uri):
                raise DatasetNotFound(f"data.latent_norm=stats but {uri} does not exist")
            stats = LatentStats.from_json(storage.read_bytes(uri))
            mean, std = np.asarray(stats.mean, np.float32), np.asarray(stats.std, np.float32)
            if mean.shape != (c,) or std.shape != (c,):
                raise DatasetError(f"{uri}: mean/std must have {c} entries, got {mean.shape} and {std.shape}")
            return cls(1.0 / std, -mean / std, kind)
        raise DatasetError(f"unknown latent normalisation {kind!r} (scaling_factor or stats)")

    def normalize(self, x: np.ndarray) -> np.ndarray:
        return x * self.scale + self.shift

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        import torch

        scale = torch.as_tensor(self.scale, dtype=x.dtype, device=x.device)
        shift = torch.as_tensor(self.shift, dtype=x.dtype, device=x.device)
        return (x - shift) / scale

    def to_dict(self) -> dict:
        return {"kind": self.kind, "scale": self.scale.ravel().tolist(), "shift": self.shift.ravel().tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> "LatentNormalizer":
        return cls(np.asarray(d["scale"]), np.asarray(d["shift"]), d["kind"])
