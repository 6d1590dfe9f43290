"""Model names users type: DiG-{S,B,L,XL}/{2,4,8}, U-DiG-{S,B,L,XL}/{2,4,8} (DiG with long skips, [I | 0]
initialised: the release's "skipzero"), DiT-{S,B,L,XL}/{2,4,8}."""
from __future__ import annotations

import inspect
from functools import partial
from typing import Callable

import torch.nn as nn

from .dig import DiG
from .dit import DiT

# depth, hidden size, heads. DiG-XL uses 18 heads (the release's "head18"); DiT-XL 16.
_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
_DIG_XL_HEADS = 18
_PATCHES = (2, 4, 8)
# Overrides that are fixed by the name and so are not accepted.
_FIXED = {"patch_size", "long_skip"}
# Runtime-only options that no longer exist (they never changed the weights): checkpoints that recorded them still
# load, and a user who passes one is told what replaced it.
RETIRED_OVERRIDES = {"dw_conv_kernel": "the depthwise conv's Triton kernels were removed; its backward is now "
                                       "chosen by dw_conv_flipped_grad (2026-11-30)",
                     "fused_projections": "the five-way fused input projection (slower than separate GEMMs) was "
                                          "removed; packed_projections (on by default) packs q, k, v and the "
                                          "output gate into one GEMM with one gradient (2026-11-30)"}


def without_retired(model_kwargs: dict) -> dict:
    """A checkpoint's saved model kwargs without the retired runtime options."""
    return {k: v for k, v in model_kwargs.items() if k not in RETIRED_OVERRIDES}


def _registry() -> dict[str, Callable[..., nn.Module]]:
    models: dict[str, Callable[..., nn.Module]] = {}
    for size, (depth, width, heads) in _SIZES.items():
        for p in _PATCHES:
            arch = dict(depth=depth, hidden_size=width, patch_size=p)
            dig_heads = _DIG_XL_HEADS if size == "XL" else heads
            models[f"DiG-{size}/{p}"] = partial(DiG, **arch, num_heads=dig_heads)
            models[f"U-DiG-{size}/{p}"] = partial(DiG, **arch, num_heads=dig_heads, long_skip=True)
            models[f"DiT-{size}/{p}"] = partial(DiT, **arch, num_heads=heads)
    return models


_MODELS = _registry()


def list_models() -> list[str]:
    return sorted(_MODELS)


def allowed_overrides(name: str) -> list[str]:
    factory = _get(name)
    fixed = _FIXED if name.startswith("U-DiG") else _FIXED | {"skip_init"}
    return sorted(k for k in inspect.signature(factory.func).parameters if k not in fixed)


def _get(name: str) -> partial:
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(list_models())}")
    return _MODELS[name]


def create_model(name: str, **overrides) -> nn.Module:
    """Build a registered model. Overrides: input_size (int or (h, w) latent size), in_channels, num_classes,
    learn_sigma, class_dropout_prob, grad_checkpointing, pos_embed_base_size, depth, hidden_size, num_heads,
    mlp_ratio; DiG/U-DiG also gla_backend; U-DiG also skip_init ("zero" | "xavier")."""
    factory = _get(name)
    allowed = allowed_overrides(name)
    unknown = sorted(set(overrides) - set(allowed))
    retired = [f"{k}: {RETIRED_OVERRIDES[k]}" for k in unknown if k in RETIRED_OVERRIDES]
    if retired:
        raise ValueError(f"retired override(s) for {name}: {'; '.join(retired)}")
    if unknown:
        raise ValueError(f"unknown override(s) {unknown} for {name}; allowed: {', '.join(allowed)}")
    return factory(**overrides)
