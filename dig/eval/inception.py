"""The Inception-v3 network of the FID literature (TensorFlow's 2015 `classify_image_graph_def.pb`, which the ADM
evaluator runs), in PyTorch, giving the three things the ADM suite reads:

  pool     [N, 2048]   `pool_3`: global average pool of the last block (FID, Inception Score, precision/recall)
  spatial  [N, 2023]   `mixed_6/conv`: the first 7 channels of Mixed_6d's 1x1 branch (17x17), flattened in
                       TensorFlow's NHWC order (sFID)
  logits   [N, 1008]   `pool @ W` of the softmax layer, without its bias, as the ADM evaluator computes them (IS)

Input: uint8-range images [N, 3, H, W] (0..255). As in the TF graph they are resized to 299x299 with TF1's
bilinear resize (align_corners=False, no half-pixel offset) and mapped to (x - 128) / 128.

Weights: the PyTorch port of that graph used by pytorch-fid and torch-fidelity, `pt_inception-2015-12-05-
6726825d.pth` (README: where to get it). Its state-dict layout is torchvision's Inception3 with 1008 classes and
no auxiliary head; `load_inception(path)` loads it strictly. Tests build the same architecture with random
weights (`load_inception(None)`).

Differences from torchvision's Inception3 that the FID graph has: average pools in the A, C and first E blocks
do not count the padding; the last E block pools its branch with max instead of average; BatchNorm eps 1e-3.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

INCEPTION_SIZE = 299
NUM_LOGITS = 1008
SPATIAL_CHANNELS = 7


class ConvBN(nn.Module):
    """conv (no bias) → BatchNorm (eps 1e-3) → ReLU; names `conv`, `bn` as in the weight files."""

    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg_pool(x):
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class BlockA(nn.Module):  # 35x35: Mixed_5b/c/d
    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = ConvBN(cin, 64, 1)
        self.branch5x5_1 = ConvBN(cin, 48, 1)
        self.branch5x5_2 = ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1)
        self.branch_pool = ConvBN(cin, pool_features, 1)

    def forward(self, x):
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_avg_pool(x)),
        ], 1)


class BlockB(nn.Module):  # 35x35 → 17x17: Mixed_6a
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = ConvBN(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, 3, stride=2),
        ], 1)


class BlockC(nn.Module):  # 17x17 with factorised 7x7: Mixed_6b/c/d/e
    def __init__(self, cin: int, c7: int):
        super().__init__()
        self.branch1x1 = ConvBN(cin, 192, 1)
        self.branch7x7_1 = ConvBN(cin, c7, 1)
        self.branch7x7_2 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = ConvBN(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = ConvBN(cin, c7, 1)
        self.branch7x7dbl_2 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = ConvBN(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = ConvBN(cin, 192, 1)

    def forward(self, x):
        dbl = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):
            dbl = layer(dbl)
        return torch.cat([
            self.branch1x1(x),
            self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
            dbl,
            self.branch_pool(_avg_pool(x)),
        ], 1)


class BlockD(nn.Module):  # 17x17 → 8x8: Mixed_7a
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = ConvBN(cin, 192, 1)
        self.branch3x3_2 = ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBN(cin, 192, 1)
        self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

    def forward(self, x):
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], 1)


class BlockE(nn.Module):  # 8x8 with split 3x3: Mixed_7b (average pool) and Mixed_7c (max pool)
    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = ConvBN(cin, 320, 1)
        self.branch3x3_1 = ConvBN(cin, 384, 1)
        self.branch3x3_2a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = ConvBN(cin, 448, 1)
        self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = ConvBN(cin, 192, 1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        d3 = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg_pool(x)
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(b3), self.branch3x3_2b(b3),
            self.branch3x3dbl_3a(d3), self.branch3x3dbl_3b(d3),
            self.branch_pool(pooled),
        ], 1)


class InceptionV3Features(nn.Module):
    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
        self.Mixed_5b = BlockA(192, 32)
        self.Mixed_5c = BlockA(256, 64)
        self.Mixed_5d = BlockA(288, 64)
        self.Mixed_6a = BlockB(288)
        self.Mixed_6b = BlockC(768, 128)
        self.Mixed_6c = BlockC(768, 160)
        self.Mixed_6d = BlockC(768, 160)
        self.Mixed_6e = BlockC(768, 192)
        self.Mixed_7a = BlockD(768)
        self.Mixed_7b = BlockE(1280, max_pool=False)
        self.Mixed_7c = BlockE(2048, max_pool=True)
        self.fc = nn.Linear(2048, NUM_LOGITS)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """images: [N, 3, H, W], values 0..255 (any float/uint8 dtype) → dict(pool, spatial, logits)."""
        x = resize_bilinear_tf1(images.float(), INCEPTION_SIZE, INCEPTION_SIZE)
        x = (x - 128.0) / 128.0
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c):
            x = block(x)
        spatial = self.Mixed_6d.branch1x1(x)[:, :SPATIAL_CHANNELS]          # mixed_6/conv, first 7 channels
        spatial = spatial.permute(0, 2, 3, 1).flatten(1)                    # NHWC order, as TF flattens it
        for block in (self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        pool = x.mean(dim=(2, 3))
        return {"pool": pool, "spatial": spatial, "logits": pool @ self.fc.weight.t()}


def resize_bilinear_tf1(x: torch.Tensor, out_h: int, out_w: int) -> torch.Tensor:
    """TensorFlow 1's `ResizeBilinear` (align_corners=False, half_pixel_centers=False), which the FID graph uses:
    output pixel i samples input position i * in/out (no half-pixel offset), clamped at the last row/column."""
    n, c, in_h, in_w = x.shape
    if (in_h, in_w) == (out_h, out_w):
        return x

    def axis(size_in: int, size_out: int):
        src = torch.arange(size_out, dtype=torch.float64, device=x.device) * (size_in / size_out)
        lo = src.floor().long().clamp(max=size_in - 1)
        hi = (lo + 1).clamp(max=size_in - 1)
        return lo, hi, (src - lo).to(x.dtype)

    y0, y1, fy = axis(in_h, out_h)
    x0, x1, fx = axis(in_w, out_w)
    rows = x[:, :, y0] + (x[:, :, y1] - x[:, :, y0]) * fy.view(1, 1, -1, 1)
    return rows[..., x0] + (rows[..., x1] - rows[..., x0]) * fx.view(1, 1, 1, -1)


def load_inception(weights: str | None, device: str | torch.device = "cpu") -> InceptionV3Features:
    """The network in eval mode. `weights`: path to the pt_inception-2015-12-05 state dict (strict load), or None
    for random weights (tests only: the numbers are then meaningless)."""
    import os
    import warnings

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # random weights are the same in every process (training ranks, dig eval)
        net = InceptionV3Features()
    if weights is None:
        warnings.warn("Inception-v3 with RANDOM weights: FID/IS/precision/recall are meaningless (tests only)",
                      stacklevel=2)
    else:
        if not os.path.isfile(weights):
            raise FileNotFoundError(
                f"Inception weights {weights!r} not found. Download pt_inception-2015-12-05-6726825d.pth once (see "
                "README, 'Evaluation') and pass its path (--inception / tracking.eval.inception / $DIG_INCEPTION)")
        state = torch.load(weights, map_location="cpu", weights_only=True)
        state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
        missing, unexpected = net.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith("num_batches_tracked")]
        if missing or unexpected:
            raise ValueError(f"{weights} is not the FID Inception-v3 state dict: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]} ({len(missing)}/{len(unexpected)} keys)")
    return net.to(device).eval().requires_grad_(False)


def default_weights() -> str | None:
    """$DIG_INCEPTION, if set."""
    import os

    return os.environ.get("DIG_INCEPTION") or None
