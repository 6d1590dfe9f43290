"""Fused-chunk gated linear attention in Triton, tuned for DiG's small heads (K <= 64, V <= 128).

One program per (batch, head) walks the sequence in chunks of CHUNK tokens and keeps the whole [K, V] state in
registers, so the forward is one kernel that reads q, k, v, g once and writes o once, and the backward is two
(a forward sweep for dq, a reverse sweep for dk, dv, dg). Nothing but the inputs is saved for backward. fla's
`chunk_gla` instead splits the work into several kernels with intermediate tensors in memory (cumulative
gates, intra-chunk scores, per-chunk states); that parallelises over the sequence, which wins when
batch x heads is too small to fill the GPU (high resolution, few images per GPU). `dig.ops.gla` chooses.

Numerics. Across chunks a query is decayed from the chunk start and a key to the chunk end: every exponent is
<= 0. Inside a chunk the decay between query i and key j <= i, exp(G_i - G_j) with G the in-chunk cumulative
gate, is factorised as exp(G_i) * exp(-G_j) so that all intra-chunk terms are tensor-core products; that is
exact in float32 while the chunk's total decay stays below FACTORISED_MAX_DECAY nats in every channel (DiG's
gates, logsigmoid(x)/16, decay a few nats per chunk). A chunk with stronger decay takes an exact per-key loop
whose exponents are all <= 0 (slower, only for extreme gates). Dots run in IEEE float32 for float32 inputs and
in TF32 for bf16/fp16 inputs (bf16 values are exact in TF32; the state and every gate stay in float32).

Backward. With G_t the cumulative gate over the whole sequence, o_t = sum_{s<=t} (q_t e^{G_t - G_s} . k_s) v_s
(+ q_t e^{G_t} S_0), so dL/dG_t = q_t * dq_t - k_t * dk_t (+ S_T * dS_T summed over V at t = T), and
dg_s = sum_{t>=s} dL/dG_t: a reverse cumulative sum that the reverse sweep carries across chunks.

The reference is `gla_torch.py` (exact, float32/float64); tests run these kernels on GPUs and, through Triton's
interpreter (TRITON_INTERPRET=1), on the CPU.
"""
from __future__ import annotations

import functools
import importlib.util
import os

import torch

CHUNK = 16
NUM_WARPS = 4
FACTORISED_MAX_DECAY = 40.0
MAX_K = 64
MAX_V = 128


# Module constants, not calls, so that torch.compile traces gla_triton without a graph break.
TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # Triton's CPU interpreter (tests)


def triton_installed() -> bool:
    return TRITON_INSTALLED


def supports(q: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether these head sizes fit the fused kernels (the whole state of a head in one program's registers)."""
    return q.shape[-1] <= MAX_K and v.shape[-1] <= MAX_V


@functools.lru_cache(maxsize=None)
def _kernels():
    from . import gla_triton_kernels as kern

    return kern.fwd_kernel, kern.bwd_dq_kernel, kern.bwd_dkv_kernel


def _launch_args(q: torch.Tensor, v: torch.Tensor) -> dict:
    B, T, H, K = q.shape
    return dict(T=T, H=H, K=K, V=v.shape[-1], BT=CHUNK, BK=_block(K), BV=_block(v.shape[-1]),
                PRECISION="ieee" if q.dtype == torch.float32 else "tf32", num_warps=NUM_WARPS)


def _block(n: int) -> int:
    return max(16, 1 << (n - 1).bit_length())


def _forward(q, k, v, g, scale, h0, output_final_state):
    fwd, _, _ = _kernels()
    B, T, H, K = q.shape
    o = torch.empty_like(v, dtype=q.dtype)
    ht = q.new_empty(B, H, K, v.shape[-1], dtype=torch.float32) if output_final_state else None
    fwd[(B * H,)](q, k, v, g, o, h0, ht, scale, FACTORISED_MAX_DECAY, USE_H0=h0 is not None,
                  STORE_HT=output_final_state, **_launch_args(q, v))
    return o, ht


def _backward(q, k, v, g, h0, scale, do, dht, need_dh0):
    _, bwd_dq, bwd_dkv = _kernels()
    B, T, H, K = q.shape
    do = do.contiguous()
    dht = dht.contiguous() if dht is not None else None
    dq = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    final_dg = torch.empty(B, H, K, dtype=torch.float32, device=q.device) if dht is not None else None
    common = _launch_args(q, v)
    bwd_dq[(B * H,)](q, k, v, g, do, dq, dht, final_dg, h0, scale, FACTORISED_MAX_DECAY,
                     USE_H0=h0 is not None, USE_DHT=dht is not None, **common)
    dk, dv, dg = torch.empty_like(k), torch.empty_like(v), torch.empty_like(g)
    dh0 = torch.empty_like(h0, dtype=torch.float32) if h0 is not None and need_dh0 else None
    bwd_dkv[(B * H,)](q, k, v, g, do, dq, dk, dv, dg, dht, final_dg, dh0, scale, FACTORISED_MAX_DECAY,
                      USE_DHT=dht is not None, STORE_DH0=dh0 is not None, **common)
    return dq.to(q.dtype), dk, dv, dg, dh0


class _FusedChunkGLA(torch.autograd.Function):
    """With states (initial and/or final): an autograd Function, run eagerly."""

    @staticmethod
    def forward(ctx, q, k, v, g, scale, initial_state, output_final_state):
        o, ht = _forward(q, k, v, g, scale, initial_state, output_final_state)
        ctx.save_for_backward(q, k, v, g, initial_state)
        ctx.scale = scale
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, h0 = ctx.saved_tensors
        dq, dk, dv, dg, dh0 = _backward(q, k, v, g, h0, ctx.scale, do, dht, ctx.needs_input_grad[5])
        return dq, dk, dv, dg, None, dh0, None


# Without states (DiG's case): registered operators, so that torch.compile keeps them inside a block's graph
# (an autograd Function with Triton launches would split the graph in two around every GLA call).
@torch.library.custom_op("dig::gla_fused_chunk", mutates_args=())
def gla_fused_chunk(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                    scale: float) -> torch.Tensor:
    return _forward(q.contiguous(), k.contiguous(), v.contiguous(), g.contiguous(), scale, None, False)[0]


@gla_fused_chunk.register_fake
def _(q, k, v, g, scale):
    return torch.empty_like(v, dtype=q.dtype, memory_format=torch.contiguous_format)


@torch.library.custom_op("dig::gla_fused_chunk_backward", mutates_args=())
def gla_fused_chunk_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                             do: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                      torch.Tensor]:
    q, k, v, g = (x.contiguous() for x in (q, k, v, g))
    return _backward(q, k, v, g, None, scale, do, None, False)[:4]


@gla_fused_chunk_backward.register_fake
def _(q, k, v, g, do, scale):
    return tuple(torch.empty_like(x, memory_format=torch.contiguous_format) for x in (q, k, v, g))


def _setup_context(ctx, inputs, output):
    q, k, v, g, scale = inputs
    ctx.save_for_backward(q, k, v, g)
    ctx.scale = scale


def _gla_fused_chunk_grad(ctx, do):
    q, k, v, g = ctx.saved_tensors
    return (*torch.ops.dig.gla_fused_chunk_backward(q, k, v, g, do, ctx.scale), None)


gla_fused_chunk.register_autograd(_gla_fused_chunk_grad, setup_context=_setup_context)


def gla_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, scale: float | None = None,
               initial_state: torch.Tensor | None = None, output_final_state: bool = False):
    """Fused-chunk GLA in `[B, T, H, K]` layout. Returns (o in q's dtype, float32 final state or None)."""
    if not all(x.is_cuda for x in (q, k, v, g)) and not _INTERPRETED:
        raise ValueError("backend='triton' runs Triton kernels and needs CUDA tensors; got "
                         f"{q.device}. Use backend='torch' (or 'auto') for tensors on {q.device}.")
    if not TRITON_INSTALLED:
        raise RuntimeError("backend='triton' needs Triton (`pip install triton`; it ships with CUDA builds of "
                           "torch). Use backend='torch' for the PyTorch implementation.")
    if not supports(q, v):
        raise ValueError(f"backend='triton' handles head sizes K <= {MAX_K}, V <= {MAX_V}; got K={q.shape[-1]}, "
                         f"V={v.shape[-1]}. Use backend='fla' or 'torch'.")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if initial_state is None and not output_final_state:
        return torch.ops.dig.gla_fused_chunk(q, k, v, g, scale), None
    if initial_state is not None:
        initial_state = initial_state.float().contiguous()
    return _FusedChunkGLA.apply(q.contiguous(), k.contiguous(), v.contiguous(), g.contiguous(), scale,
                                initial_state, output_final_state)
