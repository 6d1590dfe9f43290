"""DiG's depthwise 3x3 convolution over the token grid as Triton kernels, on the channels-last tokens in place.

Why. Each DiG block ends with a depthwise 3x3 convolution of its [N, T, C] tokens viewed as an [N, H, W, C]
image. cuDNN runs it in four kernels (forward; input gradient; weight gradient; the bias gradient, a separate
reduction) at 2.4 ms per DiG-XL/2 training step at 256 px / 32 images on an H200 and 8.8 ms at 512 px / 32
(profiled 2026-11-30), about 3.5x the bytes they must move (read x, write y; read x and dy, write dx).
Here the forward is one kernel that reads x once and writes y: 0.089 ms per DiG-XL/2 call at 512 px / 32 (GPU
time, BENCHMARKS.md), 2x its byte floor; but a compiled block runs cuDNN's convolution without its bias (inductor
folds the bias into a neighbouring fused kernel), 0.070 ms per call in the step's profile, so this forward does
not beat what the step runs (against eager F.conv2d with its bias, 0.173 ms, it looked twice as fast). cuDNN's
backward, 0.25 ms per call at 512 px, is 3.5x its floor: that is where a kernel can gain. The fused Triton backward
reads x and dy and writes dx plus each program's partial weight and bias gradients ([programs, 10, C] float32,
summed by torch) and is no faster (0.25-0.29 ms; 0.14 against 0.08 at 256 px); DIG_DWCONV_BACKWARD=triton_split
(not measured yet) computes dx with the forward kernel (dy with the taps flipped) and the weight and bias gradients
in a kernel of their own. The operator's backward is aten's convolution backward unless that variable says
otherwise, and DiG runs the operator only with model.overrides.dw_conv_kernel=true (off: no gain measured in the
step).

What. x: [N, H, W, C], contiguous (the block's tokens, row by row); weight: [C, 1, 3, 3]; bias: [C] or None.
y[n, h, w, c] = bias[c] + sum over a, b in 0..2 of weight[c, 0, a, b] * x[n, h + a - 1, w + b - 1, c], zero
padding; the sums in float32, y in x's dtype. The backward, with dy the gradient of y:
    dx[n, h, w, c]     = sum over a, b of weight[c, 0, a, b] * dy[n, h + 1 - a, w + 1 - b, c]
    dweight[c, 0, a, b] = sum over n, h, w of dy[n, h, w, c] * x[n, h + a - 1, w + b - 1, c]
    dbias[c]            = sum over n, h, w of dy[n, h, w, c]
`depthwise_conv3x3` under autocast casts x, weight and bias to the autocast dtype first, as autocast does for
every convolution, so that the kernels compute what F.conv2d computed there (`dwconv_torch.py`, the reference
and the fallback without Triton, for float64, and with kernel=False).

How it runs. Registered torch operators (`dig::depthwise_conv3x3` and its backward) with fake implementations
and an autograd formula, so a compiled block keeps them inside its graph. A program of either kernel takes a group
of rows of one image and a block of channels, sweeping each row in tiles of BLOCK_W tokens; the groups are sized
so that the GPU holds about PROGRAMS_PER_SM programs per SM (the taps are loaded once per program, and the
backward's partial gradients stay small). Tests run the kernels through Triton's interpreter on the CPU
(TRITON_INTERPRET=1, read when this module is imported).
"""
from __future__ import annotations

import importlib.util
import os

import torch

from .dwconv_torch import depthwise_conv3x3_torch

# A program's tile: BLOCK_W tokens x BLOCK_C channels, at most TILE elements in the forward and BWD_TILE in the
# backward (DiG-XL/2, C = 1152: 128 channels; 16 tokens forward, 8 backward). The forward keeps ten tiles in
# registers (three rows of three column shifts, the output), the backward about thirty (x and dy rows, and the
# weight and bias gradients, summed over the tile's tokens once at the end: a sum at every tile made a first
# version 2x slower than cuDNN). Forward tiles of 16 tokens beat 8 (0.089 against 0.134 ms per call at 512 px);
# the backward's tile and warps changed little (bench.bench_dwconv --settings, BENCHMARKS.md).
BLOCK_C = 128
TILE = 2048
BWD_TILE = 1024
FWD_WARPS = 4
BWD_WARPS = 8
PROGRAMS_PER_SM = 4  # rows per program chosen for about this many programs per SM
FWD_ROWS = 0  # > 0: rows per forward program, instead of the automatic choice (tests)
BWD_ROWS = 0  # likewise for the backward
# The operator's backward: "cudnn" (aten's convolution backward on the channels-last view), "triton" (one kernel
# for dx and the weight and bias gradients: no faster yet, see the module's docstring) or "triton_split" (dx by the
# forward kernel with the taps flipped, then a kernel for the weight and bias gradients; not measured yet).
BACKWARDS = ("cudnn", "triton", "triton_split", "tiles", "cudnn_dx")
BACKWARD = os.environ.get("DIG_DWCONV_BACKWARD", "cudnn")
# The operator's forward: "rows" (the row-sweeping kernel above), "tiles" (a kernel over flat token tiles: each
# program a tile of TILE_TOKENS consecutive tokens x TILE_CHANNELS channels, the nine neighbours as nine
# independent masked loads that the caches serve) or "cudnn" (aten's convolution on the channels-last view).
FORWARDS = ("rows", "tiles", "cudnn")
FORWARD = os.environ.get("DIG_DWCONV_FORWARD", "rows")
TILE_TOKENS = 32
TILE_CHANNELS = 128
TILE_WARPS = 4
# "tiles" and "cudnn_dx" backwards: dx as a forward of dy with the taps flipped ("tiles": the tile kernel, "cudnn_dx":
# cuDNN's forward convolution) and the weight and bias gradients by a tile kernel whose programs each sum
# DW_TILE_TOKENS x DW_TILE_CHANNELS tiles over a run of consecutive tiles (about PROGRAMS_PER_SM programs per SM).
DW_TILE_TOKENS = 16
DW_TILE_CHANNELS = 64
DW_WARPS = 4
DW_PROGRAMS = 0  # > 0: programs along the tokens, instead of the automatic choice (tests)
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Module constants, not calls, so that torch.compile traces depthwise_conv3x3 without a graph break.
TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # Triton's CPU interpreter (tests)


if TRITON_INSTALLED:
    import triton
    import triton.language as tl

    @triton.jit
    def _row3(ptr, image_start, h, w, c, c_ok, H, W, C):
        """Row h of the image starting at image_start at the columns w - 1, w and w + 1: three [BLOCK_W, BLOCK_C]
        float32 tiles, zero outside the grid (a row h outside 0 .. H - 1 is all zero)."""
        hh = w * 0 + h  # the row as a vector: Triton's interpreter mis-types a bool scalar & vector
        row_ok = ((hh >= 0) & (hh < H))[:, None] & c_ok[None, :]
        at = ptr + image_start + h.to(tl.int64) * W * C + w[:, None] * C + c[None, :]
        left = tl.load(at - C, mask=row_ok & ((w >= 1) & (w <= W))[:, None], other=0.).to(tl.float32)
        middle = tl.load(at, mask=row_ok & (w < W)[:, None], other=0.).to(tl.float32)
        right = tl.load(at + C, mask=row_ok & (w + 1 < W)[:, None], other=0.).to(tl.float32)
        return left, middle, right

    @triton.jit
    def _taps(w_ptr, c, c_ok):
        """The nine taps of the channels c, row-major ([C, 1, 3, 3] weights), as float32 vectors."""
        t = w_ptr + c * 9
        return (tl.load(t + 0, mask=c_ok, other=0.).to(tl.float32), tl.load(t + 1, mask=c_ok, other=0.).to(tl.float32),
                tl.load(t + 2, mask=c_ok, other=0.).to(tl.float32), tl.load(t + 3, mask=c_ok, other=0.).to(tl.float32),
                tl.load(t + 4, mask=c_ok, other=0.).to(tl.float32), tl.load(t + 5, mask=c_ok, other=0.).to(tl.float32),
                tl.load(t + 6, mask=c_ok, other=0.).to(tl.float32), tl.load(t + 7, mask=c_ok, other=0.).to(tl.float32),
                tl.load(t + 8, mask=c_ok, other=0.).to(tl.float32))

    @triton.jit
    def _program(GROUPS, ROWS, BLOCK_C: tl.constexpr, C):
        """This program's image, first row, and channels (with their mask)."""
        part = tl.program_id(0)  # n * GROUPS + group; the group's rows: group * ROWS .. + ROWS - 1 (below H)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        return part, part // GROUPS, (part % GROUPS) * ROWS, c, c < C

    # Both kernels sweep a column strip of BLOCK_W tokens down their rows and keep the rows above and at the current
    # one in registers, so that each row of x (and dy) is read once per strip, three column shifts, not three times.

    @triton.jit
    def _forward_kernel(x_ptr, w_ptr, b_ptr, y_ptr, H, W, C, ROWS, GROUPS, HAS_BIAS: tl.constexpr,
                        BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
        part, n, first_row, c, c_ok = _program(GROUPS, ROWS, BLOCK_C, C)
        t00, t01, t02, t10, t11, t12, t20, t21, t22 = _taps(w_ptr, c, c_ok)
        if HAS_BIAS:
            bias = tl.load(b_ptr + c, mask=c_ok, other=0.).to(tl.float32)
        else:
            bias = tl.zeros([BLOCK_C], dtype=tl.float32)
        image_start = (n * H).to(tl.int64) * W * C
        for w0 in range(0, W, BLOCK_W):
            w = w0 + tl.arange(0, BLOCK_W)
            a_l, a_c, a_r = _row3(x_ptr, image_start, first_row - 1, w, c, c_ok, H, W, C)  # the row above
            b_l, b_c, b_r = _row3(x_ptr, image_start, first_row, w, c, c_ok, H, W, C)  # the current row
            for r in range(0, ROWS):
                h = first_row + r
                c_l, c_c, c_r = _row3(x_ptr, image_start, h + 1, w, c, c_ok, H, W, C)  # the row below
                y = (bias[None, :] + t00[None, :] * a_l + t01[None, :] * a_c + t02[None, :] * a_r
                     + t10[None, :] * b_l + t11[None, :] * b_c + t12[None, :] * b_r
                     + t20[None, :] * c_l + t21[None, :] * c_c + t22[None, :] * c_r)
                mask = ((w < W) & (w * 0 + h < H))[:, None] & c_ok[None, :]  # the last group may pass row H - 1
                tl.store(y_ptr + image_start + h.to(tl.int64) * W * C + w[:, None] * C + c[None, :],
                         y.to(y_ptr.dtype.element_ty), mask=mask)
                a_l, a_c, a_r, b_l, b_c, b_r = b_l, b_c, b_r, c_l, c_c, c_r

    @triton.jit
    def _backward_kernel(x_ptr, w_ptr, dy_ptr, dx_ptr, dw_part_ptr, H, W, C, ROWS, GROUPS, BLOCK_W: tl.constexpr,
                         BLOCK_C: tl.constexpr):
        part, n, first_row, c, c_ok = _program(GROUPS, ROWS, BLOCK_C, C)
        t00, t01, t02, t10, t11, t12, t20, t21, t22 = _taps(w_ptr, c, c_ok)
        image_start = (n * H).to(tl.int64) * W * C
        # the weight and bias gradients, summed elementwise over the tiles and over the tile's tokens only at the end
        zero = tl.zeros([BLOCK_W, BLOCK_C], dtype=tl.float32)
        g00, g01, g02, g10, g11, g12, g20, g21, g22, gb = zero, zero, zero, zero, zero, zero, zero, zero, zero, zero
        for w0 in range(0, W, BLOCK_W):
            w = w0 + tl.arange(0, BLOCK_W)
            xa_l, xa_c, xa_r = _row3(x_ptr, image_start, first_row - 1, w, c, c_ok, H, W, C)
            xb_l, xb_c, xb_r = _row3(x_ptr, image_start, first_row, w, c, c_ok, H, W, C)
            da_l, da_c, da_r = _row3(dy_ptr, image_start, first_row - 1, w, c, c_ok, H, W, C)
            db_l, db_c, db_r = _row3(dy_ptr, image_start, first_row, w, c, c_ok, H, W, C)
            for r in range(0, ROWS):
                h = first_row + r
                xc_l, xc_c, xc_r = _row3(x_ptr, image_start, h + 1, w, c, c_ok, H, W, C)
                dc_l, dc_c, dc_r = _row3(dy_ptr, image_start, h + 1, w, c, c_ok, H, W, C)
                g00, g01, g02, g10, g11, g12, g20, g21, g22, gb = _add_tap_grads(
                    db_c, xa_l, xa_c, xa_r, xb_l, xb_c, xb_r, xc_l, xc_c, xc_r,
                    g00, g01, g02, g10, g11, g12, g20, g21, g22, gb)
                # dx at (h, w): tap (a, b) brings dy from (h + 1 - a, w + 1 - b)
                dx = (t00[None, :] * dc_r + t01[None, :] * dc_c + t02[None, :] * dc_l
                      + t10[None, :] * db_r + t11[None, :] * db_c + t12[None, :] * db_l
                      + t20[None, :] * da_r + t21[None, :] * da_c + t22[None, :] * da_l)
                mask = ((w < W) & (w * 0 + h < H))[:, None] & c_ok[None, :]
                tl.store(dx_ptr + image_start + h.to(tl.int64) * W * C + w[:, None] * C + c[None, :],
                         dx.to(dx_ptr.dtype.element_ty), mask=mask)
                xa_l, xa_c, xa_r, xb_l, xb_c, xb_r = xb_l, xb_c, xb_r, xc_l, xc_c, xc_r
                da_l, da_c, da_r, db_l, db_c, db_r = db_l, db_c, db_r, dc_l, dc_c, dc_r
        _store_parts(dw_part_ptr, part, c, c_ok, C, g00, g01, g02, g10, g11, g12, g20, g21, g22, gb)

    @triton.jit
    def _weight_grad_kernel(x_ptr, dy_ptr, dw_part_ptr, H, W, C, ROWS, GROUPS, BLOCK_W: tl.constexpr,
                            BLOCK_C: tl.constexpr):
        """The split backward's second half: each program's partial weight and bias gradients (the first half, dx,
        is the forward kernel on dy with the taps flipped). Twenty tiles live instead of the fused kernel's thirty:
        three rows of x, dy's current row, ten accumulators."""
        part, n, first_row, c, c_ok = _program(GROUPS, ROWS, BLOCK_C, C)
        image_start = (n * H).to(tl.int64) * W * C
        zero = tl.zeros([BLOCK_W, BLOCK_C], dtype=tl.float32)
        g00, g01, g02, g10, g11, g12, g20, g21, g22, gb = zero, zero, zero, zero, zero, zero, zero, zero, zero, zero
        for w0 in range(0, W, BLOCK_W):
            w = w0 + tl.arange(0, BLOCK_W)
            xa_l, xa_c, xa_r = _row3(x_ptr, image_start, first_row - 1, w, c, c_ok, H, W, C)
            xb_l, xb_c, xb_r = _row3(x_ptr, image_start, first_row, w, c, c_ok, H, W, C)
            for r in range(0, ROWS):
                h = first_row + r
                xc_l, xc_c, xc_r = _row3(x_ptr, image_start, h + 1, w, c, c_ok, H, W, C)
                mask = ((w < W) & (w * 0 + h < H))[:, None] & c_ok[None, :]
                dy = tl.load(dy_ptr + image_start + h.to(tl.int64) * W * C + w[:, None] * C + c[None, :], mask=mask,
                             other=0.).to(tl.float32)
                g00, g01, g02, g10, g11, g12, g20, g21, g22, gb = _add_tap_grads(
                    dy, xa_l, xa_c, xa_r, xb_l, xb_c, xb_r, xc_l, xc_c, xc_r,
                    g00, g01, g02, g10, g11, g12, g20, g21, g22, gb)
                xa_l, xa_c, xa_r, xb_l, xb_c, xb_r = xb_l, xb_c, xb_r, xc_l, xc_c, xc_r
        _store_parts(dw_part_ptr, part, c, c_ok, C, g00, g01, g02, g10, g11, g12, g20, g21, g22, gb)

    # The tile kernels see the image as a flat run of N * H * W tokens: token t is at row (t // W) % H, column t % W,
    # and its neighbour (dh, dw) is token t + dh * W + dw when that stays inside the image.

    @triton.jit
    def _neighbours(ptr, t, h, w, c, c_ok, dh: tl.constexpr, dw: tl.constexpr, H, W, C, NT):
        """The [BLOCK_T, BLOCK_C] float32 tile of the neighbours (dh, dw) of the tokens t, zero outside the image."""
        ok = (t < NT) & (h + dh >= 0) & (h + dh < H) & (w + dw >= 0) & (w + dw < W)
        at = ptr + (t + dh * W + dw).to(tl.int64)[:, None] * C + c[None, :]
        return tl.load(at, mask=ok[:, None] & c_ok[None, :], other=0.).to(tl.float32)

    @triton.jit
    def _tile_forward_kernel(x_ptr, w_ptr, b_ptr, y_ptr, H, W, C, NT, HAS_BIAS: tl.constexpr,
                             BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
        t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        c_ok = c < C
        h, w = (t // W) % H, t % W
        t00, t01, t02, t10, t11, t12, t20, t21, t22 = _taps(w_ptr, c, c_ok)
        y = (t00[None, :] * _neighbours(x_ptr, t, h, w, c, c_ok, -1, -1, H, W, C, NT)
             + t01[None, :] * _neighbours(x_ptr, t, h, w, c, c_ok, -1, 0, H, W, C, NT)
             + t02[None, :] * _neighbours(x_ptr, t, h, w, c, c_ok, -1, 1, H, W, C, NT)
             + t10[None, :] * _neighbours(x_ptr, t, h, w, c, c_ok, 0, -1, H, W, C, NT)
             + t11[None, :] * _neighbours(x_ptr, t, h, w, c, c_ok, 0, 0, H, W, C, NT)
             + t12[None, :] * _neighbours(x_ptr, t, h, w, c, c_ok, 0, 1, H, W, C, NT)
             + t20[None, :] * _neighbours(x_ptr, t, h, w, c, c_ok, 1, -1, H, W, C, NT)
             + t21[None, :] * _neighbours(x_ptr, t, h, w, c, c_ok, 1, 0, H, W, C, NT)
             + t22[None, :] * _neighbours(x_ptr, t, h, w, c, c_ok, 1, 1, H, W, C, NT))
        if HAS_BIAS:
            y += tl.load(b_ptr + c, mask=c_ok, other=0.).to(tl.float32)[None, :]
        tl.store(y_ptr + t.to(tl.int64)[:, None] * C + c[None, :], y.to(y_ptr.dtype.element_ty),
                 mask=(t < NT)[:, None] & c_ok[None, :])

    @triton.jit
    def _tile_weight_grad_kernel(x_ptr, dy_ptr, dw_part_ptr, H, W, C, NT, TILES, BLOCK_T: tl.constexpr,
                                 BLOCK_C: tl.constexpr):
        """Each program's partial weight and bias gradients over TILES consecutive token tiles."""
        part = tl.program_id(0)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        c_ok = c < C
        zero = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
        g00, g01, g02, g10, g11, g12, g20, g21, g22, gb = zero, zero, zero, zero, zero, zero, zero, zero, zero, zero
        for i in range(0, TILES):
            t = (part * TILES + i) * BLOCK_T + tl.arange(0, BLOCK_T)
            h, w = (t // W) % H, t % W
            dy = _neighbours(dy_ptr, t, h, w, c, c_ok, 0, 0, H, W, C, NT)
            g00 += dy * _neighbours(x_ptr, t, h, w, c, c_ok, -1, -1, H, W, C, NT)
            g01 += dy * _neighbours(x_ptr, t, h, w, c, c_ok, -1, 0, H, W, C, NT)
            g02 += dy * _neighbours(x_ptr, t, h, w, c, c_ok, -1, 1, H, W, C, NT)
            g10 += dy * _neighbours(x_ptr, t, h, w, c, c_ok, 0, -1, H, W, C, NT)
            g11 += dy * _neighbours(x_ptr, t, h, w, c, c_ok, 0, 0, H, W, C, NT)
            g12 += dy * _neighbours(x_ptr, t, h, w, c, c_ok, 0, 1, H, W, C, NT)
            g20 += dy * _neighbours(x_ptr, t, h, w, c, c_ok, 1, -1, H, W, C, NT)
            g21 += dy * _neighbours(x_ptr, t, h, w, c, c_ok, 1, 0, H, W, C, NT)
            g22 += dy * _neighbours(x_ptr, t, h, w, c, c_ok, 1, 1, H, W, C, NT)
            gb += dy
        _store_parts(dw_part_ptr, part, c, c_ok, C, g00, g01, g02, g10, g11, g12, g20, g21, g22, gb)

    @triton.jit
    def _add_tap_grads(dy, xa_l, xa_c, xa_r, xb_l, xb_c, xb_r, xc_l, xc_c, xc_r,
                       g00, g01, g02, g10, g11, g12, g20, g21, g22, gb):
        """The weight and bias gradients plus this tile's terms: dy at (h, w) reads x at (h + a - 1, w + b - 1)
        through tap (a, b), with x's rows above (a), at (b) and below (c) h; dy is zero for a row past H - 1."""
        return (g00 + dy * xa_l, g01 + dy * xa_c, g02 + dy * xa_r, g10 + dy * xb_l, g11 + dy * xb_c, g12 + dy * xb_r,
                g20 + dy * xc_l, g21 + dy * xc_c, g22 + dy * xc_r, gb + dy)

    @triton.jit
    def _store_parts(dw_part_ptr, part, c, c_ok, C, g00, g01, g02, g10, g11, g12, g20, g21, g22, gb):
        """This program's [10, C] row of partial gradients (the 9 taps, then the bias), each summed over its tile's
        tokens."""
        out = dw_part_ptr + part.to(tl.int64) * 10 * C + c
        tl.store(out + 0 * C, tl.sum(g00, axis=0), mask=c_ok)
        tl.store(out + 1 * C, tl.sum(g01, axis=0), mask=c_ok)
        tl.store(out + 2 * C, tl.sum(g02, axis=0), mask=c_ok)
        tl.store(out + 3 * C, tl.sum(g10, axis=0), mask=c_ok)
        tl.store(out + 4 * C, tl.sum(g11, axis=0), mask=c_ok)
        tl.store(out + 5 * C, tl.sum(g12, axis=0), mask=c_ok)
        tl.store(out + 6 * C, tl.sum(g20, axis=0), mask=c_ok)
        tl.store(out + 7 * C, tl.sum(g21, axis=0), mask=c_ok)
        tl.store(out + 8 * C, tl.sum(g22, axis=0), mask=c_ok)
        tl.store(out + 9 * C, tl.sum(gb, axis=0), mask=c_ok)


def _blocks(W: int, C: int, tile: int) -> tuple[int, int]:
    """(BLOCK_W, BLOCK_C): the channel block, and as many tokens of a row as fit in `tile` (powers of two)."""
    block_c = min(BLOCK_C, 1 << (C - 1).bit_length())
    return min(1 << (W - 1).bit_length(), max(1, tile // block_c)), block_c


def _rows_per_program(N: int, H: int, channel_blocks: int, device: torch.device, rows: int) -> int:
    if rows > 0:
        return min(rows, H)
    if not device.type == "cuda":  # Triton's interpreter: one row per program
        return 1
    from .gla_triton import sm_count_of

    target = PROGRAMS_PER_SM * sm_count_of(device)
    return max(1, min(H, N * H * channel_blocks // target))


def _grid(x: torch.Tensor, tile: int, rows: int) -> tuple[tuple[int, int], dict]:
    N, H, W, C = x.shape
    block_w, block_c = _blocks(W, C, tile)
    channel_blocks = triton.cdiv(C, block_c)
    rows = _rows_per_program(N, H, channel_blocks, x.device, rows)
    groups = triton.cdiv(H, rows)
    return (N * groups, channel_blocks), dict(ROWS=rows, GROUPS=groups, BLOCK_W=block_w, BLOCK_C=block_c)


def _forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if FORWARD not in FORWARDS:
        raise ValueError(f"DIG_DWCONV_FORWARD must be one of {', '.join(FORWARDS)}, got {FORWARD!r}")
    x, weight = x.contiguous(), weight.contiguous()
    if FORWARD == "cudnn":
        return _cudnn_forward(x, weight, bias)
    if FORWARD == "tiles":
        return _tile_forward(x, weight, bias)
    return _rows_forward(x, weight, bias)


def _rows_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    N, H, W, C = x.shape
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    if y.numel():
        grid, sizes = _grid(x, TILE, FWD_ROWS)
        _forward_kernel[grid](x, weight, bias if bias is not None else weight, y, H, W, C, **sizes,
                              HAS_BIAS=bias is not None, num_warps=FWD_WARPS)
    return y


def _cudnn_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """aten's convolution of the channels-last view (cuDNN on CUDA), as [N, H, W, C] again."""
    y = torch.ops.aten.convolution(x.permute(0, 3, 1, 2), weight, bias, [1, 1], [1, 1], [1, 1], False, [0, 0],
                                   x.shape[-1])
    return y.permute(0, 2, 3, 1).contiguous()


def _tile_sizes(tokens: int, C: int, block_t: int, block_c: int) -> tuple[int, int]:
    return min(block_t, 1 << max(0, tokens - 1).bit_length()), min(block_c, 1 << (C - 1).bit_length())


def _tile_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    N, H, W, C = x.shape
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    if y.numel():
        tokens = N * H * W
        block_t, block_c = _tile_sizes(tokens, C, TILE_TOKENS, TILE_CHANNELS)
        _tile_forward_kernel[(triton.cdiv(tokens, block_t), triton.cdiv(C, block_c))](
            x, weight, bias if bias is not None else weight, y, H, W, C, tokens, HAS_BIAS=bias is not None,
            BLOCK_T=block_t, BLOCK_C=block_c, num_warps=TILE_WARPS)
    return y


def _tile_weight_grads(x: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """[10, C] float32: the nine taps' gradients, then the bias's."""
    N, H, W, C = x.shape
    tokens = N * H * W
    block_t, block_c = _tile_sizes(tokens, C, DW_TILE_TOKENS, DW_TILE_CHANNELS)
    channel_blocks, tiles = triton.cdiv(C, block_c), triton.cdiv(tokens, block_t)
    if DW_PROGRAMS > 0:
        token_programs = DW_PROGRAMS
    elif x.device.type == "cuda":
        from .gla_triton import sm_count_of

        token_programs = max(1, PROGRAMS_PER_SM * sm_count_of(x.device) // channel_blocks)
    else:  # Triton's interpreter
        token_programs = 2
    per_program = triton.cdiv(tiles, min(tiles, token_programs))
    programs = triton.cdiv(tiles, per_program)
    parts = torch.empty(programs, 10, C, dtype=torch.float32, device=x.device)
    _tile_weight_grad_kernel[(programs, channel_blocks)](x, dy, parts, H, W, C, tokens, per_program,
                                                         BLOCK_T=block_t, BLOCK_C=block_c, num_warps=DW_WARPS)
    return parts.sum(0)


def _backward(x: torch.Tensor, weight: torch.Tensor, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                                             torch.Tensor]:
    """dx (x's dtype), dweight (weight's), dbias (weight's dtype; the caller casts it to the bias's)."""
    if BACKWARD not in BACKWARDS:
        raise ValueError(f"DIG_DWCONV_BACKWARD must be one of {', '.join(BACKWARDS)}, got {BACKWARD!r}")
    x, weight, dy = x.contiguous(), weight.contiguous(), dy.contiguous()
    N, H, W, C = x.shape
    if not x.numel():
        return torch.zeros_like(x), torch.zeros_like(weight), weight.new_zeros(C)
    if BACKWARD == "cudnn":
        dx, dweight, dbias = torch.ops.aten.convolution_backward(
            dy.permute(0, 3, 1, 2), x.permute(0, 3, 1, 2), weight, [C], [1, 1], [1, 1], [1, 1], False, [0, 0], C,
            [True, True, True])
        return dx.permute(0, 2, 3, 1).contiguous(), dweight.contiguous(), dbias
    # dx is a forward of dy with the taps flipped: tap (a, b) reads dy at (h + 1 - a, w + 1 - b)
    flipped = weight.flip(-2, -1).contiguous()
    if BACKWARD in ("tiles", "cudnn_dx"):
        dx = _tile_forward(dy, flipped, None) if BACKWARD == "tiles" else _cudnn_forward(dy, flipped, None)
        total = _tile_weight_grads(x, dy)
    else:
        grid, sizes = _grid(x, BWD_TILE, BWD_ROWS)
        parts = torch.empty(grid[0], 10, C, dtype=torch.float32, device=x.device)
        if BACKWARD == "triton":
            dx = torch.empty_like(x, memory_format=torch.contiguous_format)
            _backward_kernel[grid](x, weight, dy, dx, parts, H, W, C, **sizes, num_warps=BWD_WARPS)
        else:  # "triton_split"
            dx = _rows_forward(dy, flipped, None)
            _weight_grad_kernel[grid](x, dy, parts, H, W, C, **sizes, num_warps=BWD_WARPS)
        total = parts.sum(0)  # [10, C]
    # (copies: a registered operator's outputs may not alias one another)
    dweight = total[:9].t().contiguous().view(weight.shape).to(weight.dtype)
    return dx, dweight, total[9].to(weight.dtype, copy=True)


@torch.library.custom_op("dig::depthwise_conv3x3", mutates_args=())
def depthwise_conv3x3_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return _forward(x, weight, bias)


@depthwise_conv3x3_op.register_fake
def _(x, weight, bias):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("dig::depthwise_conv3x3_backward", mutates_args=())
def depthwise_conv3x3_backward(x: torch.Tensor, weight: torch.Tensor,
                               dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(x, weight, dy)


@depthwise_conv3x3_backward.register_fake
def _(x, weight, dy):
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(weight, memory_format=torch.contiguous_format), weight.new_empty(x.shape[-1]))


def _setup_context(ctx, inputs, output):
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _depthwise_conv3x3_grad(ctx, dy):
    x, weight = ctx.saved_tensors
    dx, dweight, dbias = torch.ops.dig.depthwise_conv3x3_backward(x, weight, dy)
    return dx, dweight, None if ctx.bias_dtype is None else dbias.to(ctx.bias_dtype)


depthwise_conv3x3_op.register_autograd(_depthwise_conv3x3_grad, setup_context=_setup_context)


def depthwise_conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      kernel: bool = True) -> torch.Tensor:
    """Depthwise 3x3 convolution, padding 1, of x: [N, H, W, C] (channels-last tokens) by weight [C, 1, 3, 3] and
    bias [C] (or None); returns [N, H, W, C], contiguous.

    The Triton kernels (kernel=True) for CUDA tensors (or under Triton's interpreter) in float32 / bfloat16 /
    float16 when Triton is installed, after autocast's cast to its dtype when autocast is on; otherwise the
    PyTorch reference (`depthwise_conv3x3_torch`: F.conv2d, which autocast casts itself)."""
    if x.dim() != 4 or weight.shape != (x.shape[-1], 1, 3, 3) or (bias is not None and bias.shape != x.shape[-1:]):
        raise ValueError("depthwise_conv3x3: x must be [N, H, W, C], weight [C, 1, 3, 3] and bias [C] or None; got "
                         f"x {tuple(x.shape)}, weight {tuple(weight.shape)}, "
                         f"bias {None if bias is None else tuple(bias.shape)}")
    tensors = (x, weight) + (() if bias is None else (bias,))
    if kernel and TRITON_INSTALLED and (x.is_cuda or _INTERPRETED) and all(t.dtype in KERNEL_DTYPES for t in tensors):
        device_type = x.device.type
        if device_type in ("cuda", "cpu") and torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)
            x, weight = x.to(dtype), weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        if len({t.dtype for t in (x, weight) + (() if bias is None else (bias,))}) == 1:
            if FORWARD == "cudnn" and bias is not None:
                # as inductor lowers F.conv2d: the convolution without its bias, the bias added by a fused kernel
                return torch.ops.dig.depthwise_conv3x3(x, weight, None) + bias
            return torch.ops.dig.depthwise_conv3x3(x, weight, bias)
        # mixed dtypes outside autocast: F.conv2d's own error, as without the kernels
    return depthwise_conv3x3_torch(x, weight, bias)
