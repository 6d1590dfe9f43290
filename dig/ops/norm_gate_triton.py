"""The GLA layer's output norm and gate, y = rms_norm(o) * weight * silu(gate) per head, as two Triton kernels.

Why. Under torch.compile, inductor turns DiG's `RMSNormSwishGate` into one forward and three backward kernels
(the weight gradient, a reduction over every row, the slowest of them): about 3.5 ms per DiG-XL/2 training step
on an H200 against a byte floor of about 1.3 ms. Here the forward is one kernel that reads o and gate once and
writes y; the backward one kernel that reads o, gate and dy once and writes do and dgate, plus each program's
partial weight gradient (a [programs, D] float32 buffer summed by torch: 0.6 MB at DiG-XL/2's 256 px shape).

Measured (one H200, 2026-11-29, BENCHMARKS.md): `dig train` DiG-XL/2 at 256 px / 32 images, 384 img/s with these
kernels vs 369 with inductor's fusion of the torch expression, side by side. (Before the compiled blocks turned
inductor's layout optimization off, inductor laid o and the gate out token-major around the kernels and copied
them into the row-major layout read here, and the kernels lost by 0.7 %.)

What. o, gate: [..., D] (DiG: [N, T, H, D], head dim D = 64), any of float32 / bfloat16 / float16 and not
necessarily the same; weight: [D] (DiG: a float32 parameter). Every row of D is normalised on its own:
rstd = 1 / sqrt(mean(o^2) + eps), n = o * rstd, s = silu(gate), y = n * weight * s. All math in float32; y in
o's dtype. Backward, with dy the gradient of y:
    dgate   = dy * n * weight * sigmoid(gate) * (1 + gate * (1 - sigmoid(gate)))   (gate's dtype)
    dn      = dy * weight * s
    do      = rstd * (dn - n * mean(dn * n))                                         (o's dtype)
    dweight = sum over rows of dy * n * s                                            (weight's dtype)
The gate may be the columns of a wider [N, T, X] tensor viewed as [N, T, H, D] (DiG's packed projections put q, k,
v and the gate side by side): the kernels read it in place, token rows X elements apart, instead of copying it
(`_gate_rows`), and the backward can write dgate into the same columns of that tensor's gradient (`dgate_into`,
dig/ops/gla_gated.py).
The backward recomputes rstd from o (one more sum per row, free next to the loads) rather than saving it: the
tensors saved for backward are the op's own inputs, nothing else.

How it runs. Both kernels are registered torch operators (`dig::rms_norm_swish_gate` and its backward,
`dig::rms_norm_swish_gate_backward`) with fake implementations and an autograd formula, so torch.compile keeps
them inside a block's graph instead of breaking the graph around a Triton launch. `rms_norm_swish_gate` uses
them for CUDA tensors when Triton is installed, and `norm_gate_torch.rms_norm_swish_gate_torch` (the
reference) otherwise, and for float64. Tests run the kernels on the CPU through Triton's interpreter
(TRITON_INTERPRET=1, read when this module is imported).
"""
from __future__ import annotations

import importlib.util
import os

import torch

from .norm_gate_torch import rms_norm_swish_gate_torch
from .token_rows import readable_in_place, token_stride

# One program normalises BLOCK_ROWS rows, a [BLOCK_ROWS, BLOCK_D] tile of TILE elements (BLOCK_D: D rounded up to
# a power of two; BLOCK_ROWS = 64 at D = 64). 4096 elements: a forward program reads 16 KB of bf16 o and gate in
# 16-byte vectors, enough in flight to hide DRAM latency with a few programs per SM, and the backward's partial
# weight gradients stay at 1/64 of the rows (2304 x 64 float32 at DiG-XL/2, 256 px, against 19 MB of o).
# Warps: the forward spreads the tile over 4 warps, 32 values per thread per tensor (61 registers, compiled for
# sm_90 by Triton 3.9); the backward keeps about twice as many tiles live (o, gate, dy, n, sigmoid, dn, ...), so
# it takes 8 warps for the same tile (107 registers, no spills). Chosen from those counts, not timed.
TILE = 4096
FWD_WARPS = 4
BWD_WARPS = 8
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # the kernels compute in float32: not float64

# Module constants, not calls, so that torch.compile traces rms_norm_swish_gate without a graph break.
TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # Triton's CPU interpreter (tests)


def triton_installed() -> bool:
    return TRITON_INSTALLED


def _block_d(D: int) -> int:
    return 1 << (D - 1).bit_length()


def _block_rows(D: int) -> int:
    return max(1, TILE // _block_d(D))


if TRITON_INSTALLED:
    import triton
    import triton.language as tl

    @triton.jit
    def _tile(rows, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_ROWS: tl.constexpr):
        """This program's rows: element offsets of its [BLOCK_ROWS, BLOCK_D] tile, the tile's mask, the columns."""
        row = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        col = tl.arange(0, BLOCK_D)
        return row[:, None] * D + col[None, :], (row[:, None] < rows) & (col[None, :] < D), col

    @triton.jit
    def _gate_offsets(rows, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_ROWS: tl.constexpr, H: tl.constexpr,
                      GATE_TS: tl.constexpr):
        """The gate's element offsets for this program's tile: row r is head r % H of token r // H, and a token's
        heads start GATE_TS elements apart (H * D when the gate is contiguous)."""
        row = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        col = tl.arange(0, BLOCK_D)
        return ((row // H) * GATE_TS + (row % H) * D)[:, None] + col[None, :]

    @triton.jit
    def _load_f32(ptr, offsets, mask):
        return tl.load(ptr + offsets, mask=mask, other=0.).to(tl.float32)

    @triton.jit
    def _rstd(o, eps, D: tl.constexpr):
        """1 / sqrt(mean(o^2) + eps) per row (masked lanes and rows are 0 and add nothing)."""
        return tl.rsqrt(tl.sum(o * o, axis=1) / D + eps)

    @triton.jit
    def _sigmoid(x):
        return 1. / (1. + tl.exp(-x))

    @triton.jit
    def _forward_kernel(o_ptr, gate_ptr, weight_ptr, y_ptr, rows, eps, D: tl.constexpr, BLOCK_D: tl.constexpr,
                        BLOCK_ROWS: tl.constexpr, H: tl.constexpr, GATE_TS: tl.constexpr):
        offsets, mask, col = _tile(rows, D, BLOCK_D, BLOCK_ROWS)
        o = _load_f32(o_ptr, offsets, mask)
        gate = _load_f32(gate_ptr, _gate_offsets(rows, D, BLOCK_D, BLOCK_ROWS, H, GATE_TS), mask)
        weight = _load_f32(weight_ptr, col, col < D)
        y = o * _rstd(o, eps, D)[:, None] * weight[None, :] * (gate * _sigmoid(gate))
        tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _backward_kernel(o_ptr, gate_ptr, weight_ptr, dy_ptr, do_ptr, dgate_ptr, dweight_part_ptr, rows, eps,
                         D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_ROWS: tl.constexpr, H: tl.constexpr,
                         GATE_TS: tl.constexpr, DGATE_H: tl.constexpr, DGATE_TS: tl.constexpr):
        """dgate is written in its own layout (DGATE_H, DGATE_TS: _gate_offsets'), the gate's columns of one packed
        gradient or contiguous (1, D)."""
        offsets, mask, col = _tile(rows, D, BLOCK_D, BLOCK_ROWS)
        o = _load_f32(o_ptr, offsets, mask)
        gate = _load_f32(gate_ptr, _gate_offsets(rows, D, BLOCK_D, BLOCK_ROWS, H, GATE_TS), mask)
        dy = _load_f32(dy_ptr, offsets, mask)
        weight = _load_f32(weight_ptr, col, col < D)
        rstd = _rstd(o, eps, D)
        n = o * rstd[:, None]
        sig = _sigmoid(gate)
        s = gate * sig
        dy_w = dy * weight[None, :]
        dgate = dy_w * n * sig * (1. + gate * (1. - sig))
        dn = dy_w * s
        do = rstd[:, None] * (dn - n * (tl.sum(dn * n, axis=1) / D)[:, None])
        tl.store(do_ptr + offsets, do.to(do_ptr.dtype.element_ty), mask=mask)
        tl.store(dgate_ptr + _gate_offsets(rows, D, BLOCK_D, BLOCK_ROWS, DGATE_H, DGATE_TS),
                 dgate.to(dgate_ptr.dtype.element_ty), mask=mask)
        # this program's share of dweight (masked rows have dy = 0 and add nothing)
        tl.store(dweight_part_ptr + tl.program_id(0) * D + col, tl.sum(dy * n * s, axis=0), mask=col < D)


def _sizes(D: int) -> dict:
    """The kernels' block sizes for head size D."""
    return dict(D=D, BLOCK_D=_block_d(D), BLOCK_ROWS=_block_rows(D))


def _gate_rows(gate: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The gate as the kernels read it, and its layout: a [N, T, H, D] gate whose tokens are rows of a wider tensor
    (DiG's packed projections: q, k, v, gate side by side) is read in place, H heads of D a token, tokens
    GATE_TS elements apart (`token_rows.readable_in_place`); any other layout as a contiguous one (H = 1, GATE_TS = D:
    one row after another)."""
    in_place = not gate.is_contiguous() and readable_in_place(gate)
    return (gate if in_place else gate.contiguous()), _rows_layout(gate, in_place)


def _rows_layout(x: torch.Tensor, token_rows: bool) -> dict:
    """_gate_offsets' (H, GATE_TS) for x: H heads of D in each token's row, tokens GATE_TS elements apart; or, for a
    contiguous tensor, one row after another (1, D)."""
    return dict(H=x.shape[2], GATE_TS=token_stride(x)) if token_rows else dict(H=1, GATE_TS=x.shape[-1])


def _forward(o: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    o, weight = o.contiguous(), weight.contiguous()
    gate, layout = _gate_rows(gate)
    D = o.shape[-1]
    rows = o.numel() // D
    y = torch.empty_like(o, memory_format=torch.contiguous_format)
    if rows:
        sizes = _sizes(D)
        _forward_kernel[(triton.cdiv(rows, sizes["BLOCK_ROWS"]),)](o, gate, weight, y, rows, eps, **sizes, **layout,
                                                                   num_warps=FWD_WARPS)
    return y


def _backward(o: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, dy: torch.Tensor,
              eps: float, dgate_into: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """do, dgate, dweight. dgate_into: a [N, T, H, D] view that receives dgate (the gate's columns of a packed
    gradient, a `token_rows.in_token_rows` layout), else a new tensor."""
    o, weight, dy = o.contiguous(), weight.contiguous(), dy.contiguous()
    gate, layout = _gate_rows(gate)
    D = o.shape[-1]
    rows = o.numel() // D
    do = torch.empty_like(o, memory_format=torch.contiguous_format)
    dgate = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device) if dgate_into is None else dgate_into
    dgate_layout = _rows_layout(dgate, dgate_into is not None)
    if not rows:
        return do, dgate, torch.zeros_like(weight)
    sizes = _sizes(D)
    programs = triton.cdiv(rows, sizes["BLOCK_ROWS"])
    dweight_parts = torch.empty(programs, D, dtype=torch.float32, device=o.device)
    _backward_kernel[(programs,)](o, gate, weight, dy, do, dgate, dweight_parts, rows, eps, **sizes, **layout,
                                  DGATE_H=dgate_layout["H"], DGATE_TS=dgate_layout["GATE_TS"], num_warps=BWD_WARPS)
    return do, dgate, dweight_parts.sum(0).to(weight.dtype)


@torch.library.custom_op("dig::rms_norm_swish_gate", mutates_args=())
def rms_norm_swish_gate_op(o: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _forward(o, gate, weight, eps)


@rms_norm_swish_gate_op.register_fake
def _(o, gate, weight, eps):
    return torch.empty_like(o, memory_format=torch.contiguous_format)


@torch.library.custom_op("dig::rms_norm_swish_gate_backward", mutates_args=())
def rms_norm_swish_gate_backward(o: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, dy: torch.Tensor,
                                 eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(o, gate, weight, dy, eps)


@rms_norm_swish_gate_backward.register_fake
def _(o, gate, weight, dy, eps):
    return tuple(torch.empty_like(x, memory_format=torch.contiguous_format) for x in (o, gate, weight))


def _setup_context(ctx, inputs, output):
    o, gate, weight, eps = inputs
    ctx.save_for_backward(o, gate, weight)
    ctx.eps = eps


def _rms_norm_swish_gate_grad(ctx, dy):
    o, gate, weight = ctx.saved_tensors
    return (*torch.ops.dig.rms_norm_swish_gate_backward(o, gate, weight, dy, ctx.eps), None)


rms_norm_swish_gate_op.register_autograd(_rms_norm_swish_gate_grad, setup_context=_setup_context)


def rms_norm_swish_gate(o: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """rms_norm(o) * weight * silu(gate) over the last dim (o, gate: [..., D], weight: [D]), in o's dtype.

    The Triton kernels for CUDA tensors (or under Triton's interpreter) in float32 / bfloat16 / float16 when
    Triton is installed; otherwise the PyTorch reference (`rms_norm_swish_gate_torch`), the same math."""
    if o.dim() == 0 or o.shape[-1] == 0 or gate.shape != o.shape or weight.shape != o.shape[-1:]:
        raise ValueError("rms_norm_swish_gate: o and gate must share a shape [..., D] (D > 0) and weight be [D]; "
                         f"got o {tuple(o.shape)}, gate {tuple(gate.shape)}, weight {tuple(weight.shape)}")
    if len({o.device, gate.device, weight.device}) != 1:
        raise ValueError(f"rms_norm_swish_gate: inputs on different devices: o {o.device}, gate {gate.device}, "
                         f"weight {weight.device}")
    on_kernels = TRITON_INSTALLED and (o.is_cuda or _INTERPRETED) and all(
        x.dtype in KERNEL_DTYPES for x in (o, gate, weight))
    if on_kernels:
        return torch.ops.dig.rms_norm_swish_gate(o, gate, weight, eps)
    return rms_norm_swish_gate_torch(o, gate, weight, eps)
