"""Inference beside training: load a trained model (an export or a run directory's EMA), sample images from class
labels, sample grids, distributed sampling to the ADM `.npz`, and the latent normaliser shared with the reader.

    from dig.inference import load_pipeline
    pipe = load_pipeline("runs/dig-xl2-imagenet256")            # or a `dig export` folder
    images = pipe.sample([207, 360, 387], cfg_scale=4.0)       # PIL images, one per class label

Submodules import torch lazily where they can: the shard reader's loading process imports the normaliser only.
"""
from __future__ import annotations

__all__ = ["Pipeline", "load_pipeline", "load_model", "load_exported", "sample_to_npz"]


def __getattr__(name: str):
    if name in ("Pipeline", "load_pipeline"):
        from . import pipeline

        return getattr(pipeline, name)
    if name in ("load_model", "load_exported"):
        from . import loading

        return getattr(loading, name)
    if name == "sample_to_npz":
        from .sample_npz import sample_to_npz

        return sample_to_npz
    raise AttributeError(f"module 'dig.inference' has no attribute {name!r}")
