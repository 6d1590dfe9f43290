"""DiG's SwiGLU after its gate/up projection in plain PyTorch: out = (silu(gate) * up) @ weight^T.

The reference for the Triton kernels in `swiglu_triton.py`. gate_up is the gate/up projection's output, [..., 2F]
with the gate in the first F columns and up in the last F (dig/models/dig.py's SwiGLU); weight is the down
projection's, [D, F].
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def silu_times_up(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def swiglu_down_torch(gate_up: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.linear(silu_times_up(gate_up), weight)
