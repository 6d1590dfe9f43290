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
