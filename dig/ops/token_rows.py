"""Whether a [B, T, H, D] tensor can be read by our Triton kernels where it is: tokens at one stride, each token's
heads and channels packed in its row. DiG's packed projections give q, k, v and the output gate as the columns of
one [B, T, X] tensor (`unpack_qkvz`); the GLA and norm-gate kernels read them in place instead of copying them, and
their backward kernels write the gradient in the same layout (gla_gated.py)."""
from __future__ import annotations

import torch


def token_stride(x: torch.Tensor) -> int:
    """Elements between consecutive tokens of a [B, T, H, D] tensor as the kernels read it (H * D if contiguous).
    A size-1 dimension's stride means nothing (torch may report anything for it): the batch's, or H * D."""
    B, T, H, D = x.shape
    if T > 1:
        return x.stride(1)
    return x.stride(0) if B > 1 else H * D


def readable_in_place(x: torch.Tensor) -> bool:
    """x is [B, T, H, D] with tokens `token_stride(x)` apart, heads and channels packed in each token's row, batches
    T tokens apart, and 16-byte aligned rows, so that the kernels' vector loads stay as wide as a contiguous
    tensor's (a misaligned view would compile to slower, narrow-load kernels)."""
    return in_token_rows(x) and x.data_ptr() % 16 == 0 and token_stride(x) * x.element_size() % 16 == 0


def in_token_rows(x: torch.Tensor) -> bool:
    """x is [B, T, H, D] with tokens `token_stride(x)` apart, heads and channels packed in each token's row and
    batches T tokens apart: where the kernels can address it (to read it as fast as a contiguous tensor, it must
    also be aligned: readable_in_place)."""
    if x.dim() != 4:
        return False
    B, T, H, D = x.shape
    stride = token_stride(x)
    return ((D == 1 or x.stride(3) == 1) and (H == 1 or x.stride(2) == D) and stride >= H * D
            and (B == 1 or x.stride(0) == T * stride))


def unpack_qkvz(qkvz: torch.Tensor, heads: int, key_dim: int) -> tuple[torch.Tensor, ...]:
    """q, k, v and the output gate as [B, T, H, D] views of a [B, T, 2HK + 2HV] tensor whose columns are
    q | k | v | gate, heads in order within each (DiG's packed projections)."""
    rest = qkvz.shape[-1] - 2 * heads * key_dim if qkvz.dim() == 3 else 0
    if rest <= 0 or rest % (2 * heads):
        raise ValueError(f"packed q|k|v|gate must be [B, T, 2HK + 2HV]; with {heads} heads of key dim {key_dim}, got "
                         f"shape {tuple(qkvz.shape)}")
    dims = (key_dim, key_dim, rest // (2 * heads), rest // (2 * heads))
    return tuple(x.unflatten(-1, (heads, d)) for x, d in zip(qkvz.split([heads * d for d in dims], dim=-1), dims))
