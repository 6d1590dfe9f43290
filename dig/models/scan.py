"""DiG's spatial reorientation (SREM scanning). GLA is causal, so the token order decides what each token sees.

After block i the sequence is reversed (a 180-degree rotation of the token grid), and after every odd i the
grid is also transposed (an h x w grid becomes w x h). Block inputs therefore cycle through four scan
directions: row-major, reversed row-major, column-major, reversed column-major. Both operations are
involutions and commute, so raster order is restored by undoing the net parity of each before unpatchify.
Sequences are always (N, T, D) and `grid` is the (rows, cols) shape the current sequence fills row by row.
"""
from __future__ import annotations

import torch


def transpose_grid(x: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int]]:
    rows, cols = grid
    n, t, d = x.shape
    if rows * cols != t:
        raise ValueError(f"grid {grid} does not hold {t} tokens")
    return x.reshape(n, rows, cols, d).transpose(1, 2).reshape(n, t, d), (cols, rows)


REVERSE, REVERSE_TRANSPOSE = "reverse", "reverse+transpose"


def reorientation_after_block(index: int) -> str:
    """What follows block `index` (0-based): reverse always, then transpose after odd indices. (A name, not the
    index: a compiled block specialises on it, whereas an int argument that changes becomes a dynamic size.)"""
    return REVERSE_TRANSPOSE if index % 2 else REVERSE


def reoriented_grid(grid: tuple[int, int], how: str) -> tuple[int, int]:
    return (grid[1], grid[0]) if how == REVERSE_TRANSPOSE else grid


def reorient(x: torch.Tensor, grid: tuple[int, int], how: str) -> tuple[torch.Tensor, tuple[int, int]]:
    """Reversing the sequence is flipping both grid axes, so reverse + transpose is one gather (one copy, not two)."""
    if how == REVERSE:
        return x.flip(1), grid
    if how != REVERSE_TRANSPOSE:
        raise ValueError(f"unknown reorientation {how!r}; expected {REVERSE!r} or {REVERSE_TRANSPOSE!r}")
    rows, cols = grid
    n, t, d = x.shape
    if rows * cols != t:
        raise ValueError(f"grid {grid} does not hold {t} tokens")
    return x.reshape(n, rows, cols, d).flip(1, 2).transpose(1, 2).reshape(n, t, d), (cols, rows)


def reorient_after_block(x: torch.Tensor, grid: tuple[int, int], index: int) -> tuple[torch.Tensor, tuple[int, int]]:
    return reorient(x, grid, reorientation_after_block(index))


def restore_raster(x: torch.Tensor, grid: tuple[int, int], depth: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Undo the reorientations of `depth` blocks (depth reversals, depth // 2 transposes)."""
    if (depth // 2) % 2:
        x, grid = transpose_grid(x, grid)
    if depth % 2:
        x = x.flip(1)
    return x, grid
