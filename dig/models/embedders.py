"""Pieces DiG and DiT share, as in DiT: patch, timestep and label embedders, the fixed 2-D sin-cos position
embedding, adaLN modulation and the final adaLN layer."""
from __future__ import annotations

import math

import torch
import torch.nn as nn


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class PatchEmbed(nn.Module):
    """(N, C, H, W) latents -> (N, H/p * W/p, D) tokens in raster order (row by row)."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """Scalar (possibly fractional) timesteps -> sinusoidal features (256 frequencies) -> MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        """[cos(t * f_i), sin(t * f_i)] with f_i = max_period^(-i / (dim/2)), computed in float32."""
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class labels -> vectors. Row `num_classes` is the null class; in training each label is replaced by it
    with probability `dropout_prob` (classifier-free guidance)."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        if not 0.0 <= dropout_prob < 1.0:
            raise ValueError(f"class_dropout_prob must be in [0, 1), got {dropout_prob}")
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)

    def token_drop(self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if force_drop_ids is None:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop = force_drop_ids == 1
        return torch.where(drop, torch.full_like(labels, self.num_classes), labels)

    def forward(self, labels: torch.Tensor, train: bool, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)


class FinalLayer(nn.Module):
    """adaLN (shift, scale) -> Linear to p*p*out_channels per token."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """MAE/DiT 1-D embedding: [sin(p * w_i), cos(p * w_i)], w_i = 10000^(-i / (dim/2)), in float64."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding needs an even width, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64, device=positions.device) / (dim / 2))
    out = positions.to(torch.float64).reshape(-1, 1) * omega[None]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_pos_embed_2d(dim: int, grid: tuple[int, int], base_grid: tuple[int, int] | None = None) -> torch.Tensor:
    """(gh*gw, dim) float32 table for a gh x gw token grid in raster order. As in DiT/MAE the first half of the
    channels encodes the column (x) coordinate, the second half the row. With `base_grid`, coordinates along
    each axis are scaled by base/grid so a larger grid spans the same range as the base grid (how a
    high-resolution fine-tune reuses a lower-resolution model's positions)."""
    if dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs hidden_size divisible by 4, got {dim}")
    gh, gw = grid
    rows = torch.arange(gh, dtype=torch.float64)
    cols = torch.arange(gw, dtype=torch.float64)
    if base_grid is not None:
        rows = rows * (base_grid[0] / gh)
        cols = cols * (base_grid[1] / gw)
    row_of_token = rows.repeat_interleave(gw)
    col_of_token = cols.repeat(gh)
    return torch.cat([sincos_1d(dim // 2, col_of_token), sincos_1d(dim // 2, row_of_token)], dim=1).float()


def pair(size: int | tuple[int, int] | list[int], what: str) -> tuple[int, int]:
    """An int or an (h, w) pair of positive ints -> (h, w)."""
    if isinstance(size, int) and not isinstance(size, bool):
        size = (size, size)
    if (not isinstance(size, (tuple, list)) or len(size) != 2
            or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)):
        raise ValueError(f"{what} must be a positive int or an (h, w) pair of positive ints, got {size!r}")
    return int(size[0]), int(size[1])


__all__ = ["modulate", "PatchEmbed", "TimestepEmbedder", "LabelEmbedder", "FinalLayer", "sincos_1d",
           "sincos_pos_embed_2d", "pair"]
