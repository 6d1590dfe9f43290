"""DiG's GLA forget gate after its first low-rank projection, g = logsigmoid(low @ weight^T + bias) / normalizer, as
one forward and one backward Triton kernel.

Why. fla's GLA layer computes its per-key-channel forget gate through a rank-16 bottleneck: Linear(D, 16), then
Linear(16, H*K) with a bias, logsigmoid, / 16. Under torch.compile the second half is a cuBLAS GEMM with a reduction
dimension of 16 writing the [tokens, H*K] pre-activation, an elementwise logsigmoid reading it back, and autograd
saves the pre-activation for the backward; the backward is an elementwise kernel, two more GEMMs (the low-rank
input's and the weight's gradients) and a reduction for the bias. Each pass moves a [tokens, H*K] tensor for 16
multiply-adds per element. Here the forward is one kernel that reads the 16-wide input and writes g; the backward
one kernel that reads the 16-wide input and dg, recomputes the pre-activation and writes d(low), plus per-program
partial weight and bias gradients (summed by torch). Only low, weight and bias are saved.

What. low [..., R] (R = 16 in DiG), weight [N, R], bias [N] (N = H*K), normalizer > 0. All math in float32 (IEEE
dots: 16 terms), g in low's dtype:
    pre = low @ weight^T + bias;  g = logsigmoid(pre) / normalizer
    dpre = dg * sigmoid(-pre) / normalizer
    dlow = dpre @ weight (low's dtype);  dweight = dpre^T @ low;  dbias = sum of dpre over rows (their dtypes)
logsigmoid(x) = min(x, 0) - log1p(exp(-|x|)), with log1p evaluated accurately for small arguments.

How it runs. Registered operators (`dig::low_rank_gate`, `dig::low_rank_gate_backward`) with fake implementations
and an autograd formula, so a compiled block stays one graph. `kernels_apply` says whether a tensor runs on them
(CUDA, or Triton's CPU interpreter in tests, TRITON_INTERPRET=1 read at import). The reference is
`low_rank_gate_torch.py`.
"""
from __future__ import annotations

import importlib.util
import os

import torch

# A forward program computes a [BLOCK_T tokens, BLOCK_N] tile of g; a backward program BLOCK_T_BWD tokens, all N
# columns in blocks of BLOCK_N, so that its weight-gradient partials are [N, R] per BLOCK_T_BWD tokens (64 programs,
# 2.4 MB of float32 partials at DiG-XL/2, 256 px / 32 images). Not tuned.
BLOCK_T = 64
BLOCK_N = 64
BLOCK_T_BWD = 128
FWD_WARPS = 4
BWD_WARPS = 8
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def kernels_apply(low: torch.Tensor) -> bool:
    """low runs on the Triton kernels: Triton installed, a CUDA tensor (or the interpreter), a kernel dtype."""
    return TRITON_INSTALLED and (low.is_cuda or _INTERPRETED) and low.dtype in KERNEL_DTYPES


if TRITON_INSTALLED:
    import triton
    import triton.language as tl

    @triton.jit
    def _pre_activation(low, weight_ptr, bias_ptr, n, R: tl.constexpr, N: tl.constexpr, BLOCK_R: tl.constexpr):
        """low [T, BLOCK_R] (float32, zero past R) @ weight[n]^T + bias[n] for the columns n, and the weight rows."""
        r = tl.arange(0, BLOCK_R)
        weight = tl.load(weight_ptr + n[:, None] * R + r[None, :], mask=(n[:, None] < N) & (r[None, :] < R),
                         other=0.).to(tl.float32)
        bias = tl.load(bias_ptr + n, mask=n < N, other=0.).to(tl.float32)
        return tl.dot(low, tl.trans(weight), input_precision="ieee") + bias[None, :], weight

    @triton.jit
    def _load_low(low_ptr, rows, t, R: tl.constexpr, BLOCK_R: tl.constexpr):
        r = tl.arange(0, BLOCK_R)
        return tl.load(low_ptr + t[:, None] * R + r[None, :], mask=(t[:, None] < rows) & (r[None, :] < R),
                       other=0.).to(tl.float32)

    @triton.jit
    def low_rank_gate_fwd_kernel(low_ptr, weight_ptr, bias_ptr, g_ptr, rows, inv_normalizer, R: tl.constexpr,
                                 N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr,
                                 BLOCK_N: tl.constexpr):
        t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        pre, _ = _pre_activation(_load_low(low_ptr, rows, t, R, BLOCK_R), weight_ptr, bias_ptr, n, R, N, BLOCK_R)
        e = tl.exp(-tl.abs(pre))
        u = 1. + e
        log1p_e = tl.where(u == 1., e, tl.log(u) * (e / (u - 1.)))  # log1p(e), accurate when e is tiny
        g = (tl.minimum(pre, 0.) - log1p_e) * inv_normalizer
        tl.store(g_ptr + t[:, None] * N + n[None, :], g.to(g_ptr.dtype.element_ty),
                 mask=(t[:, None] < rows) & (n[None, :] < N))

    @triton.jit
    def low_rank_gate_bwd_kernel(low_ptr, weight_ptr, bias_ptr, dg_ptr, dlow_ptr, dweight_part_ptr, dbias_part_ptr,
                                 rows, inv_normalizer, R: tl.constexpr, N: tl.constexpr, BLOCK_R: tl.constexpr,
                                 BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr):
        pid = tl.program_id(0)
        t = pid.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
        low = _load_low(low_ptr, rows, t, R, BLOCK_R)
        r = tl.arange(0, BLOCK_R)
        dlow = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
        for start in tl.static_range(0, N, BLOCK_N):
            n = start + tl.arange(0, BLOCK_N)
            pre, weight = _pre_activation(low, weight_ptr, bias_ptr, n, R, N, BLOCK_R)
            dg = tl.load(dg_ptr + t[:, None] * N + n[None, :], mask=(t[:, None] < rows) & (n[None, :] < N),
                         other=0.).to(tl.float32)
            dpre = dg * inv_normalizer / (1. + tl.exp(pre))  # dg * sigmoid(-pre) / normalizer; 0 on masked rows
            dlow += tl.dot(dpre, weight, input_precision="ieee")
            # this program's share of dweight and dbias for columns n
            tl.store(dweight_part_ptr + pid * N * R + n[:, None] * R + r[None, :],
                     tl.dot(tl.trans(dpre), low, input_precision="ieee"), mask=(n[:, None] < N) & (r[None, :] < R))
            tl.store(dbias_part_ptr + pid * N + n, tl.sum(dpre, axis=0), mask=n < N)
        tl.store(dlow_ptr + t[:, None] * R + r[None, :], dlow.to(dlow_ptr.dtype.element_ty),
                 mask=(t[:, None] < rows) & (r[None, :] < R))


def _sizes(low: torch.Tensor, weight: torch.Tensor) -> dict:
    R, N = weight.shape[1], weight.shape[0]
    return dict(R=R, N=N, BLOCK_R=max(16, triton.next_power_of_2(R)))


def _forward(low: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, normalizer: float) -> torch.Tensor:
    low, weight, bias = low.contiguous(), weight.contiguous(), bias.contiguous()
    sizes = _sizes(low, weight)
    rows = low.numel() // sizes["R"]
    g = torch.empty(low.shape[:-1] + (sizes["N"],), dtype=low.dtype, device=low.device)
    if rows:
        grid = (triton.cdiv(rows, BLOCK_T), triton.cdiv(sizes["N"], BLOCK_N))
        low_rank_gate_fwd_kernel[grid](low, weight, bias, g, rows, 1. / normalizer, **sizes, BLOCK_T=BLOCK_T,
                                       BLOCK_N=BLOCK_N, num_warps=FWD_WARPS)
    return g


def _backward(low: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, dg: torch.Tensor,
              normalizer: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    low, weight, bias, dg = low.contiguous(), weight.contiguous(), bias.contiguous(), dg.contiguous()
    sizes = _sizes(low, weight)
    R, N = sizes["R"], sizes["N"]
    rows = low.numel() // R
    dlow = torch.empty_like(low)
    if not rows:
        return dlow, torch.zeros_like(weight), torch.zeros_like(bias)
    programs = triton.cdiv(rows, BLOCK_T_BWD)
    dweight_parts = torch.empty(programs, N, R, dtype=torch.float32, device=low.device)
    dbias_parts = torch.empty(programs, N, dtype=torch.float32, device=low.device)
    low_rank_gate_bwd_kernel[(programs,)](low, weight, bias, dg, dlow, dweight_parts, dbias_parts, rows,
                                          1. / normalizer, **sizes, BLOCK_T=BLOCK_T_BWD, BLOCK_N=BLOCK_N,
                                          num_warps=BWD_WARPS)
    return dlow, dweight_parts.sum(0).to(weight.dtype), dbias_parts.sum(0).to(bias.dtype)


@torch.library.custom_op("dig::low_rank_gate", mutates_args=())
def low_rank_gate_op(low: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, normalizer: float) -> torch.Tensor:
    return _forward(low, weight, bias, normalizer)


@low_rank_gate_op.register_fake
def _(low, weight, bias, normalizer):
    return low.new_empty(low.shape[:-1] + (weight.shape[0],))


@torch.library.custom_op("dig::low_rank_gate_backward", mutates_args=())
def low_rank_gate_backward(low: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, dg: torch.Tensor,
                           normalizer: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(low, weight, bias, dg, normalizer)


@low_rank_gate_backward.register_fake
def _(low, weight, bias, dg, normalizer):
    return tuple(torch.empty_like(x, memory_format=torch.contiguous_format) for x in (low, weight, bias))


def _setup_context(ctx, inputs, output):
    low, weight, bias, normalizer = inputs
    ctx.save_for_backward(low, weight, bias)
    ctx.normalizer = normalizer


def _low_rank_gate_grad(ctx, dg):
    low, weight, bias = ctx.saved_tensors
    return (*torch.ops.dig.low_rank_gate_backward(low, weight, bias, dg, ctx.normalizer), None)


low_rank_gate_op.register_autograd(_low_rank_gate_grad, setup_context=_setup_context)


def low_rank_gate(low: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, normalizer: float) -> torch.Tensor:
    """logsigmoid(low @ weight^T + bias) / normalizer for low [..., R], weight [N, R], bias [N], in low's dtype, on
    the Triton kernels (callers check `kernels_apply` first; the reference is
    low_rank_gate_torch.low_rank_gate_torch). Saves only low, weight and bias for the backward."""
    if (weight.dim() != 2 or low.dim() < 1 or low.shape[-1] != weight.shape[1] or weight.shape[1] == 0
            or bias.shape != weight.shape[:1]):
        raise ValueError(f"low_rank_gate: low must be [..., R], weight [N, R] and bias [N] with R > 0; got low "
                         f"{tuple(low.shape)}, weight {tuple(weight.shape)}, bias {tuple(bias.shape)}")
    if not normalizer > 0:
        raise ValueError(f"low_rank_gate: the normalizer must be positive, got {normalizer}")
    if len({low.device, weight.device, bias.device}) != 1:
        raise ValueError(f"low_rank_gate: inputs on different devices: low {low.device}, weight {weight.device}, "
                         f"bias {bias.device}")
    if not kernels_apply(low) or weight.dtype not in KERNEL_DTYPES or bias.dtype not in KERNEL_DTYPES:
        raise ValueError(f"low_rank_gate: no Triton kernels for low {low.dtype} on {low.device}, weight "
                         f"{weight.dtype}, bias {bias.dtype}")
    return torch.ops.dig.low_rank_gate(low, weight, bias, float(normalizer))
