"""Loading a trained model for inference: a `dig export` folder (model.safetensors + config.json) or, straight
from training, a run directory / checkpoint folder (its EMA weights; nothing is written to disk)."""
from __future__ import annotations

import json
import os

import torch

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def is_export(folder: str) -> bool:
    # A run directory has a config.json too (the resolved training config): only the weights mark an export.
    return os.path.exists(os.path.join(folder, WEIGHTS_FILE))


def load_exported(folder: str, device: str | torch.device = "cpu", **overrides):
    """(model in eval mode, info dict) from an exported folder; `overrides` go to create_model."""
    from safetensors.torch import load_file

    with open(os.path.join(folder, CONFIG_FILE)) as f:
        info = json.load(f)
    return _build(info, load_file(os.path.join(folder, WEIGHTS_FILE)), device, overrides), info


def load_model(source: str, device: str | torch.device = "cpu", **overrides):
    """(model in eval mode, info dict) from an export folder, a run directory (its latest checkpoint's EMA) or a
    checkpoint folder. `info` has what sampling needs: model, model_kwargs, latent_shape, normalizer, vae,
    classes, step."""
    if not os.path.isdir(source):
        raise FileNotFoundError(f"{source}: no such folder (expected a `dig export` folder or a run directory)")
    if is_export(source):
        return load_exported(source, device, **overrides)
    from dig.train import checkpoint

    ckpt = checkpoint.resolve_checkpoint(source)
    meta = checkpoint.load_trainer_meta(ckpt)
    info = {k: meta.get(k) for k in ("model_kwargs", "latent_shape", "normalizer", "vae", "classes", "step")}
    info.update(model=meta["model_name"], weights="ema", source_checkpoint=os.path.abspath(ckpt))
    return _build(info, checkpoint.load_ema_full(ckpt), device, overrides), info


def _build(info: dict, state: dict, device, overrides: dict):
    from dig.models import create_model, without_retired

    model = create_model(info["model"], **{**without_retired(info["model_kwargs"]), **overrides})
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return model.to(device).eval().requires_grad_(False)
