"""DiG's depthwise 3x3 convolution over the token grid in plain PyTorch: F.conv2d, with autograd's backward (the
forward of `dwconv.py`, whose backward computes the input gradient as a forward convolution).

x: [N, H, W, C] tokens laid out row by row (channels-last: the block's [N, T, C] tokens viewed as an image, no
copy); weight: [C, 1, 3, 3]; bias: [C] or None. y[n, h, w, c] = bias[c] + sum over a, b in 0..2 of
weight[c, 0, a, b] * x[n, h + a - 1, w + b - 1, c], zero outside the grid (padding 1). This is F.conv2d with
groups=C on the channels-last view, as the block computed it before `dwconv.py` (under autocast, in the autocast
dtype, as autocast runs every convolution).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def depthwise_conv3x3_torch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    y = F.conv2d(x.permute(0, 3, 1, 2), weight, bias, padding=1, groups=x.shape[-1])
    return y.permute(0, 2, 3, 1)
