"""GroupNorm, optionally followed by SiLU, in plain torch: the reference of `group_norm_triton.py`."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def group_norm_silu_torch(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
                          eps: float, silu: bool) -> torch.Tensor:
    """F.group_norm (then F.silu when `silu`) computed in float32 (float64 stays float64), returned in x's dtype."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = F.group_norm(x.to(compute), num_groups, None if weight is None else weight.to(compute),
                     None if bias is None else bias.to(compute), eps)
    return (F.silu(y) if silu else y).to(x.dtype)
