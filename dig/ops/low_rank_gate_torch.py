"""DiG's GLA forget gate after its first low-rank projection, in plain PyTorch: g = logsigmoid(low @ weight^T + bias)
/ normalizer (fla's GLA layer: gk_proj = Linear(D, 16) then Linear(16, H*K) with bias; normalizer 16).

The reference for the Triton kernels in `low_rank_gate_triton.py`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def low_rank_gate_torch(low: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                        normalizer: float) -> torch.Tensor:
    """low [..., R], weight [N, R], bias [N] -> [..., N]."""
    return F.logsigmoid(F.linear(low, weight, bias)) / normalizer
