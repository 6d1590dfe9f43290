"""DiG's GLA layer between its projections as one operator: gated linear attention of q, k, v, then the per-head
RMSNorm of its output times swish(gate), with q | k | v | gate packed in one [B, T, 2HK + 2HV] tensor.

Why. DiG's input projections q, k (D/2 each), v and the output gate (D each) have the shape of DiT's one qkv
projection when computed as one GEMM (3456 columns at DiG-XL/2), which runs faster than four GEMMs of 576 to 1152
columns. The GEMM's backward takes one gradient of that layout. The GLA gives dq, dk, dv and the norm-gate dgate;
as two operators autograd would concatenate their gradients, a full pass over the tensor (measured: the fused
projections of 2026-11-30 lost more to it than the GEMM gained). Here one operator runs both forward kernels and,
backwards, the norm-gate's kernel writes dgate and the GLA's kernels write dq, dk and dv into the columns of one
gradient tensor.

The operator also returns the GLA output o, which the backward needs (the norm-gate kernel reads it); it is not
differentiable and callers ignore it. The kernels are gla_triton's and norm_gate_triton's; the other backends
compute on the four views (`gla_gated_packed`).
"""
from __future__ import annotations

import importlib

import torch

from . import norm_gate_triton
from .token_rows import unpack_qkvz

# (the package exports a function named gla_triton: the module by its full name)
gla_triton = importlib.import_module("dig.ops.gla_triton")


def _views(qkvz: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return unpack_qkvz(qkvz, g.shape[2], g.shape[3])


@torch.library.custom_op("dig::gla_gated_packed", mutates_args=())
def gla_gated_packed_op(qkvz: torch.Tensor, g: torch.Tensor, weight: torch.Tensor, scale: float, eps: float,
                        splits: int = 0, order: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    q, k, v, gate = _views(qkvz, g)
    q, k, v, g = (gla_triton._rows_in_place(x) for x in (q, k, v, g))
    o = gla_triton._forward(q, k, v, g, scale, None, False, gla_triton._splits_for(q, splits), order)[0]
    return norm_gate_triton._forward(o, gate, weight, eps), o


@gla_gated_packed_op.register_fake
def _(qkvz, g, weight, scale, eps, splits=0, order=None):
    v = _views(qkvz, g)[2]
    return (torch.empty_like(v, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format))


@torch.library.custom_op("dig::gla_gated_packed_backward", mutates_args=())
def gla_gated_packed_backward(qkvz: torch.Tensor, g: torch.Tensor, weight: torch.Tensor, o: torch.Tensor,
                              dy: torch.Tensor, scale: float, eps: float, splits: int = 0,
                              order: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v, gate = _views(qkvz, g)
    q, k, v, g = (gla_triton._rows_in_place(x) for x in (q, k, v, g))
    dqkvz = torch.empty(qkvz.shape, dtype=qkvz.dtype, device=qkvz.device)
    dq, dk, dv, dgate = _views(dqkvz, g)
    do, _, dweight = norm_gate_triton._backward(o, gate, weight, dy, eps, dgate_into=dgate)
    dg = gla_triton._backward(q, k, v, g, None, scale, do, None, False, gla_triton._splits_for(q, splits), order,
                              grads_into=(dq, dk, dv))[3]
    return dqkvz, dg, dweight


@gla_gated_packed_backward.register_fake
def _(qkvz, g, weight, o, dy, scale, eps, splits=0, order=None):
    return (torch.empty(qkvz.shape, dtype=qkvz.dtype, device=qkvz.device),
            torch.empty_like(g, memory_format=torch.contiguous_format), torch.empty_like(weight))


def _setup_context(ctx, inputs, output):
    qkvz, g, weight, scale, eps, splits, order = inputs
    o = output[1]
    ctx.mark_non_differentiable(o)
    ctx.save_for_backward(qkvz, g, weight, o, order)
    ctx.scale, ctx.eps, ctx.splits = scale, eps, splits


def _gla_gated_packed_grad(ctx, dy, _do):  # (o is not differentiable: _do is nothing to pass on)
    qkvz, g, weight, o, order = ctx.saved_tensors
    grads = torch.ops.dig.gla_gated_packed_backward(qkvz, g, weight, o, dy, ctx.scale, ctx.eps, ctx.splits, order)
    return (*grads, None, None, None, None)


gla_gated_packed_op.register_autograd(_gla_gated_packed_grad, setup_context=_setup_context)


def gla_gated_packed_triton(qkvz: torch.Tensor, g: torch.Tensor, weight: torch.Tensor, eps: float,
                            scale: float | None = None, splits: int | None = None,
                            token_order: torch.Tensor | None = None) -> torch.Tensor:
    """rms_norm(o) * weight * silu(gate) per head of o = GLA(q, k, v, g), q | k | v | gate packed in one
    [B, T, 2HK + 2HV] tensor (H and K are g's), on the Triton kernels: y [B, T, H, V] in qkvz's dtype. Its gradient
    is one tensor of qkvz's layout."""
    q, k, v, gate = _views(qkvz, g)
    gla_triton._check_runnable(q, k, v, g)
    gla_triton._check_splits(splits)
    if weight.shape != v.shape[-1:]:
        raise ValueError(f"the norm's weight must be [V] = [{v.shape[-1]}], got {tuple(weight.shape)}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    order = None if token_order is None else gla_triton.checked_token_order(token_order, q)
    return torch.ops.dig.gla_gated_packed(qkvz, g, weight, scale, eps, splits or 0, order)[0]


# With the forget gate's low-rank projection packed too: q | k | v | gate | r in one [B, T, 2HK + 2HV + R] tensor,
# r the gate's R-wide first projection (DiG: x W1^T, R = 16), whose second projection W2 (with its bias) and the
# logsigmoid happen here: the GEMM gives the logits x = r W2^T + b, the GLA kernels compute the log decays
# logsigmoid(x) * gate_scale as they load them and write x's gradient, and that gradient's R-wide projection back
# onto r goes into the last R columns of the one gradient. So the layer's input GEMM (and its two backward GEMMs)
# also carry the gate's first projection, where it was three GEMMs of R columns or rows of its own.

def _gate_layout(qkvzr: torch.Tensor, gate_weight: torch.Tensor, weight: torch.Tensor) -> tuple[int, int, int]:
    """(H, K, R) of packed q | k | v | gate | r, from the gate's second projection [H * K, R] and the norm's [V]."""
    hk, rank = gate_weight.shape
    hv2 = qkvzr.shape[-1] - rank - 2 * hk
    v = weight.shape[0]
    if hv2 <= 0 or hv2 % (2 * v) or hk % (hv2 // (2 * v)):
        raise ValueError(f"packed q | k | v | gate | r of {qkvzr.shape[-1]} columns does not fit a gate projection "
                         f"of {tuple(gate_weight.shape)} and heads of V = {v}")
    heads = hv2 // (2 * v)
    return heads, hk // heads, rank


def unpack_qkvzr(qkvzr: torch.Tensor, gate_weight: torch.Tensor, weight: torch.Tensor):
    """q, k, v, gate ([B, T, H, D] views) and r ([B * T, R], rows at qkvzr's token stride)."""
    heads, key_dim, rank = _gate_layout(qkvzr, gate_weight, weight)
    qkvz, low_rank = qkvzr.split([qkvzr.shape[-1] - rank, rank], dim=-1)
    return (*unpack_qkvz(qkvz, heads, key_dim), low_rank.flatten(0, 1))


def _gate_logits(low_rank: torch.Tensor, gate_weight: torch.Tensor, gate_bias: torch.Tensor,
                 like: torch.Tensor) -> torch.Tensor:
    """r W2^T + b as [B, T, H, K] (like q)."""
    return torch.addmm(gate_bias, low_rank, gate_weight.t()).view(like.shape)


@torch.library.custom_op("dig::gla_gated_packed_gate", mutates_args=())
def gla_gated_packed_gate_op(qkvzr: torch.Tensor, gate_weight: torch.Tensor, gate_bias: torch.Tensor,
                             weight: torch.Tensor, scale: float, eps: float, gate_scale: float, splits: int = 0,
                             order: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v, gate, low_rank = unpack_qkvzr(qkvzr, gate_weight, weight)
    logits = _gate_logits(low_rank, gate_weight, gate_bias, q)
    q, k, v = (gla_triton._rows_in_place(x) for x in (q, k, v))
    o = gla_triton._forward(q, k, v, logits, scale, None, False, gla_triton._splits_for(q, splits), order,
                            gate_logits=gate_scale)[0]
    return norm_gate_triton._forward(o, gate, weight, eps), o, logits


@gla_gated_packed_gate_op.register_fake
def _(qkvzr, gate_weight, gate_bias, weight, scale, eps, gate_scale, splits=0, order=None):
    q, _, v, _, _ = unpack_qkvzr(qkvzr, gate_weight, weight)
    contiguous = torch.contiguous_format
    return (torch.empty_like(v, memory_format=contiguous), torch.empty_like(v, memory_format=contiguous),
            torch.empty_like(q, memory_format=contiguous))


@torch.library.custom_op("dig::gla_gated_packed_gate_backward", mutates_args=())
def gla_gated_packed_gate_backward(qkvzr: torch.Tensor, gate_weight: torch.Tensor, weight: torch.Tensor,
                                   o: torch.Tensor, logits: torch.Tensor, dy: torch.Tensor, scale: float, eps: float,
                                   gate_scale: float, splits: int = 0, order: torch.Tensor | None = None
                                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v, gate, low_rank = unpack_qkvzr(qkvzr, gate_weight, weight)
    q, k, v = (gla_triton._rows_in_place(x) for x in (q, k, v))
    dqkvzr = torch.empty(qkvzr.shape, dtype=qkvzr.dtype, device=qkvzr.device)
    dq, dk, dv, dgate, _ = unpack_qkvzr(dqkvzr, gate_weight, weight)
    dlow_rank = dqkvzr.view(-1, dqkvzr.shape[-1])[:, -low_rank.shape[-1]:]  # (a view: mm writes into dqkvzr)
    do, _, dweight = norm_gate_triton._backward(o, gate, weight, dy, eps, dgate_into=dgate)
    dlogits = gla_triton._backward(q, k, v, logits, None, scale, do, None, False, gla_triton._splits_for(q, splits),
                                   order, grads_into=(dq, dk, dv), gate_logits=gate_scale)[3].flatten(0, 1).flatten(1)
    torch.mm(dlogits, gate_weight, out=dlow_rank)  # (cuBLAS writes the R columns in place, rows qkvzr's stride)
    return dqkvzr, dlogits.t() @ low_rank, dlogits.sum(0), dweight


@gla_gated_packed_gate_backward.register_fake
def _(qkvzr, gate_weight, weight, o, logits, dy, scale, eps, gate_scale, splits=0, order=None):
    return (torch.empty(qkvzr.shape, dtype=qkvzr.dtype, device=qkvzr.device), torch.empty_like(gate_weight),
            torch.empty(gate_weight.shape[0], dtype=gate_weight.dtype, device=gate_weight.device),
            torch.empty_like(weight))


def _gate_setup_context(ctx, inputs, output):
    qkvzr, gate_weight, gate_bias, weight, scale, eps, gate_scale, splits, order = inputs
    _, o, logits = output
    ctx.mark_non_differentiable(o, logits)
    ctx.save_for_backward(qkvzr, gate_weight, weight, o, logits, order)
    ctx.scale, ctx.eps, ctx.gate_scale, ctx.splits = scale, eps, gate_scale, splits


def _gla_gated_packed_gate_grad(ctx, dy, _do, _dlogits):  # (o and the logits are not differentiable)
    qkvzr, gate_weight, weight, o, logits, order = ctx.saved_tensors
    grads = torch.ops.dig.gla_gated_packed_gate_backward(qkvzr, gate_weight, weight, o, logits, dy, ctx.scale,
                                                         ctx.eps, ctx.gate_scale, ctx.splits, order)
    return (*grads, None, None, None, None, None)


gla_gated_packed_gate_op.register_autograd(_gla_gated_packed_gate_grad, setup_context=_gate_setup_context)


def gla_gated_packed_gate_triton(qkvzr: torch.Tensor, gate_weight: torch.Tensor, gate_bias: torch.Tensor,
                                 gate_scale: float, weight: torch.Tensor, eps: float, scale: float | None = None,
                                 splits: int | None = None, token_order: torch.Tensor | None = None) -> torch.Tensor:
    """gla_gated_packed_triton with the forget gate's low-rank first projection r packed as the last R columns
    (q | k | v | gate | r) and g = logsigmoid(r W2^T + b) * gate_scale computed inside (gate_weight: W2 [H * K, R],
    gate_bias: b [H * K], in qkvzr's dtype). Its gradient is one tensor of qkvzr's layout, plus W2's and b's."""
    q, k, v, _, _ = unpack_qkvzr(qkvzr, gate_weight, weight)
    gla_triton._check_runnable(q, k, v, gate_weight)
    gla_triton._check_splits(splits)
    if gate_bias.shape != gate_weight.shape[:1] or not qkvzr.dtype == gate_weight.dtype == gate_bias.dtype:
        raise ValueError(f"the gate's projection must be [H * K, R] with a [H * K] bias, both in the packed "
                         f"tensor's dtype {qkvzr.dtype}; got {tuple(gate_weight.shape)} {gate_weight.dtype} and "
                         f"{tuple(gate_bias.shape)} {gate_bias.dtype}")
    if not gate_scale > 0:
        raise ValueError(f"gate_scale must be positive (the log decays are logsigmoid(x) * gate_scale), got "
                         f"{gate_scale!r}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    order = None if token_order is None else gla_triton.checked_token_order(token_order, q)
    return torch.ops.dig.gla_gated_packed_gate(qkvzr, gate_weight, gate_bias, weight, scale, eps, float(gate_scale),
                                               splits or 0, order)[0]
