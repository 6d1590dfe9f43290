"""`dig export`: a checkpoint's consolidated weights (EMA by default) as safetensors + a config JSON that
`create_model` understands; `dig.inference.load_exported` is the inverse."""
from __future__ import annotations

import json
import os
import sys
import time

import torch

from dig.inference.loading import CONFIG_FILE, WEIGHTS_FILE, load_exported  # noqa: F401  (the export's reader)

from . import checkpoint


def export(source: str, out_dir: str, weights: str = "ema", progress: bool = True) -> str:
    """`source`: a run directory (its latest checkpoint) or a checkpoint folder. `weights`: "ema" (the gathered
    EMA kept in the checkpoint) or "raw" (the ZeRO shards consolidated with DeepSpeed's zero_to_fp32).
    `progress`: a line on stderr as each stage (read, write) starts, and the time it took at the end."""
    if weights not in ("ema", "raw"):
        raise ValueError(f"weights must be 'ema' or 'raw', got {weights!r}")
    ckpt = checkpoint.resolve_checkpoint(source)
    meta = checkpoint.load_trainer_meta(ckpt)
    with _Stages(f"[dig export] step {meta['step']} of {ckpt}", enabled=progress) as stage:
        stage(f"reading the {weights} weights")
        state = checkpoint.load_ema_full(ckpt) if weights == "ema" else raw_weights(ckpt)
        state = {k: v.detach().float().contiguous() for k, v in state.items()}
        numel = sum(v.numel() for v in state.values())
        stage(f"writing {numel / 1e6:.1f}M parameters ({numel * 4 / 2 ** 30:.2f} GiB fp32) to {out_dir}")
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


class _Stages:
    """A line per stage of an export as it starts; at the end one line with the time each stage took (stderr)."""

    def __init__(self, title: str, enabled: bool = True):
        self.title, self.enabled = title, enabled
        self.times: list[tuple[str, float]] = []

    def __enter__(self):
        return self

    def __call__(self, name: str) -> None:
        self.times.append((name, time.monotonic()))
        if self.enabled:
            print(f"{self.title}: {name} ...", file=sys.stderr, flush=True)

    def __exit__(self, exc_type, *rest) -> None:
        if exc_type is None and self.enabled and self.times:
            ends = [t for _, t in self.times[1:]] + [time.monotonic()]
            took = ", ".join(f"{name.split()[0]} {end - start:.1f}s" for (name, start), end in zip(self.times, ends))
            print(f"{self.title}: done ({took})", file=sys.stderr, flush=True)


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
