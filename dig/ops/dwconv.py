"""DiG's depthwise 3x3 convolution over the token grid, with the input gradient computed as a forward convolution.

x: [N, H, W, C] channels-last tokens (the block's [N, T, C] viewed as an image, no copy); weight: [C, 1, 3, 3];
bias: [C] or None. The forward is F.conv2d on the channels-last view (`dwconv_torch.py`, the reference). The
backward differs from autograd's: the input gradient of a 3x3 convolution with padding 1 is the same convolution of
dy with the taps flipped in both axes,
    dx[n, h, w, c] = sum over a, b of weight[c, 0, a, b] * dy[n, h + 1 - a, w + 1 - b, c],
and cuDNN's forward kernel computes that in half the time of its input-gradient kernel: on an H200 at DiG-XL/2's
shapes (C = 1152, bf16), 0.065 against 0.127 ms per call at 512 px / 32 images and 0.020 against 0.033 at 256 px
(`bench.bench_dwconv`, BENCHMARKS.md). The weight gradient stays cuDNN's, the bias gradient a sum that inductor fuses.

Under torch.compile the function's forward and backward are traced into the block's graph (an autograd.Function
of aten ops), so inductor treats these convolutions as it treats F.conv2d's. Under autocast x, weight and bias are
cast first by autocast's rule for a convolution (floating-point inputs other than float64 to the autocast dtype),
so the saved x is the one the convolution read.

Triton kernels for this convolution were written and measured (git history, e712747): a row-sweeping forward
(0.090 ms at 512 px), a flat-tile forward (0.098), fused and split backwards, a flat-tile weight gradient (0.12
against cuDNN's 0.083): none beat cuDNN, and they are gone.
"""
from __future__ import annotations

import torch

from .dwconv_torch import depthwise_conv3x3_torch


class _DepthwiseConv3x3(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return depthwise_conv3x3_torch(x, weight, bias)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        dx = dweight = dbias = None
        if ctx.needs_input_grad[0]:
            dx = depthwise_conv3x3_torch(dy, weight.flip(-2, -1), None)
        if ctx.needs_input_grad[1]:
            C = x.shape[-1]
            dweight = torch.ops.aten.convolution_backward(
                dy.permute(0, 3, 1, 2), x.permute(0, 3, 1, 2), weight, None, [1, 1], [1, 1], [1, 1], False, [0, 0],
                C, [False, True, False])[1]
        if ctx.has_bias and ctx.needs_input_grad[2]:
            dbias = dy.sum((0, 1, 2), dtype=torch.promote_types(dy.dtype, torch.float32)).to(dy.dtype)
        return dx, dweight, dbias


def depthwise_conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      flipped_input_grad: bool = True) -> torch.Tensor:
    """Depthwise 3x3 convolution, padding 1, of x: [N, H, W, C] by weight [C, 1, 3, 3] and bias [C] (or None);
    returns [N, H, W, C]. flipped_input_grad=False: plain F.conv2d (autograd's backward, cuDNN's input-gradient
    kernel), for measuring one against the other."""
    if x.dim() != 4 or weight.shape != (x.shape[-1], 1, 3, 3) or (bias is not None and bias.shape != x.shape[-1:]):
        raise ValueError("depthwise_conv3x3: x must be [N, H, W, C], weight [C, 1, 3, 3] and bias [C] or None; got "
                         f"x {tuple(x.shape)}, weight {tuple(weight.shape)}, "
                         f"bias {None if bias is None else tuple(bias.shape)}")
    if not flipped_input_grad:
        return depthwise_conv3x3_torch(x, weight, bias)
    device_type = x.device.type
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        # autocast's rule for a convolution: floating-point inputs other than float64 in the autocast dtype
        dtype = torch.get_autocast_dtype(device_type)
        x, weight, bias = (t if t is None or not t.is_floating_point() or t.dtype == torch.float64 else t.to(dtype)
                           for t in (x, weight, bias))
    return _DepthwiseConv3x3.apply(x, weight, bias)
