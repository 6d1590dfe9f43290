"""The GLA layer's output norm and gate in plain PyTorch: y = rms_norm(o) * weight * silu(gate), per head.

The reference for the Triton kernels in `norm_gate_triton.py`, and their fallback on devices without them. The
math is DiG's `RMSNormSwishGate` (dig/models/dig.py) as it is: computed in float32 (float64 when an input is
float64), the result in o's dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm_swish_gate_torch(o: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor,
                              eps: float) -> torch.Tensor:
    """o, gate: [..., D]; weight: [D]. Returns rms_norm(o) * weight * silu(gate) over the last dim, in o's dtype."""
    compute = torch.float64 if torch.float64 in (o.dtype, gate.dtype, weight.dtype) else torch.float32
    y = F.rms_norm(o.to(compute), (o.shape[-1],), weight.to(compute), eps) * F.silu(gate.to(compute))
    return y.to(o.dtype)
