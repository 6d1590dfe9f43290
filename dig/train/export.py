"""`dig export`: a checkpoint's consolidated weights (EMA by default) as safetensors + a config JSON that
`create_model` understands; `load_exported` is the inverse."""
from __future__ import annotations

import json
import os

import torch

from . import checkpoint

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def export(source: str, out_dir: str, weights: str = "ema") -> str:
    """`source`: a run directory (its latest checkpoint) or a checkpoint folder. `weights`: "ema" (the gathered
    EMA kept in the checkpoint) or "raw" (the ZeRO shards consolidated with DeepSpeed's zero_to_fp32)."""
    ckpt = checkpoint.resolve_checkpoint(source)
    meta = checkpoint.load_trainer_meta(ckpt)
    if weights == "ema":
        state = checkpoint.load_ema_full(ckpt)
    elif weights == "raw":
        state = raw_weights(ckpt)
    else:
        raise ValueError(f"weights must be 'ema' or 'raw', got {weights!r}")
    state = {k: v.detach().float().contiguous() for k, v in state.items()}
    os.makedirs(out_dir, exist_ok=True)
    # the user's umask decides who may read it (safetensors alone leaves a 0600 file)
    checkpoint.write_safetensors(os.path.join(out_dir, WEIGHTS_FILE), state,
                                 metadata={"weights": weights, "step": str(meta["step"])})
    info = {
        "model": meta["model_name"],
        "model_kwargs": meta["model_kwargs"],
        "latent_shape": meta["latent_shape"],
        "normalizer": meta["normalizer"],
        "vae": meta["vae"],
        "classes": meta.get("classes"),
        "weights": weights,
        "step": meta["step"],
        "source_checkpoint": os.path.abspath(ckpt),
    }
    with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
        json.dump(info, f, indent=1)
    return out_dir


def raw_weights(ckpt: str) -> dict[str, torch.Tensor]:
    """The trained (non-EMA) fp32 weights of a checkpoint: ZeRO shards consolidated by DeepSpeed's zero_to_fp32,
    or, for ZeRO stage 0 (no shards), the module state DeepSpeed saved whole."""
    engine_dir = os.path.join(ckpt, checkpoint.ENGINE_TAG)
    if any(name.startswith("zero_pp_rank_") and "optim_states" in name for name in os.listdir(engine_dir)):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(ckpt, tag=checkpoint.ENGINE_TAG)
    state = torch.load(os.path.join(engine_dir, "mp_rank_00_model_states.pt"), map_location="cpu",
                       weights_only=False)  # written by this trainer's DeepSpeed engine
    return state["module"]


def load_exported(folder: str, device: str | torch.device = "cpu", **overrides):
    """(model in eval mode, config dict) from an exported folder; `overrides` go to create_model."""
    from safetensors.torch import load_file

    from dig.models import create_model

    with open(os.path.join(folder, CONFIG_FILE)) as f:
        info = json.load(f)
    model = create_model(info["model"], **{**info["model_kwargs"], **overrides})
    model.load_state_dict(load_file(os.path.join(folder, WEIGHTS_FILE)), strict=True)
    return model.to(device).eval(), info
