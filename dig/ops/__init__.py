"""Token-mixing ops. `gla` is gated linear attention in fla's `[B, T, H, K]` layout.

PLACEHOLDER (owned by the GLA-op work): backend dispatch between fla's `chunk_gla` (CUDA) and the exact
chunked PyTorch reference. Until then this calls the token-by-token reference in `naive.py`.
"""
from __future__ import annotations

import torch

from .naive import naive_recurrent_gla


def gla(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, scale: float | None = None,
        initial_state: torch.Tensor | None = None, output_final_state: bool = False, backend: str = "auto"):
    """o_t = (q_t*scale) S_t, S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t. Returns (o [B,T,H,V], final state or None)."""
    return naive_recurrent_gla(q, k, v, g, scale=scale, initial_state=initial_state,
                               output_final_state=output_final_state)
