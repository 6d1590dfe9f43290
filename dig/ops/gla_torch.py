"""Exact chunked gated linear attention in plain PyTorch: the CPU path and the oracle for GPU kernels.

Per head, with log-space forget gates g_t <= 0 on the key channels:
    S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t,        o_t = (q_t * scale) S_t.

Unrolled, o_t = q_t diag(exp(G_t - G_0)) S_0 + sum_{s<=t} (q_t * exp(G_t - G_s)) . k_s  v_s  with G the cumulative
gate sum. Factorising exp(G_t - G_s) = exp(G_t) exp(-G_s) is what makes naive chunked forms overflow: with strong
decays exp(-G_s) is exp(+1000). Here every exponent is a sum of gates over an interval that lies between the two
tokens, so every exp() is of a number <= 0 and nothing over- or underflows harmfully:

- across chunks (size C), a Python loop over chunks carries the state; a token's query is decayed from the chunk
  start (its inclusive in-chunk gate sum) and a key is decayed to the chunk end (the gate sum after it);
- inside a chunk, pairs (t, s) are split by halving: at the level with half-size m, each block of 2m tokens pairs
  its second half (queries) with its first half (keys) through the block's midpoint r, with
  exp(G_t - G_s) = exp(G_t - G_r) * exp(G_r - G_s), both factors <= 1. Levels m = 1, 2, ..., C/2 cover every
  pair s < t exactly once; s = t is the diagonal term (q_t . k_t) v_t. All of it is batched matmuls, so no
  [T, C, K] tensor of pairwise decays is ever materialised.

Every gate sum is taken directly over its interval (never as a difference of two long prefix sums), so the
exponents carry float32 relative precision even when the prefix sums reach thousands.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

MAX_CHUNK_SIZE = 64


def _reverse_exclusive_cumsum(x: torch.Tensor, dim: int) -> torch.Tensor:
    """y_i = sum_{j > i} x_j along `dim` (so the last entry is 0)."""
    inclusive = x.flip(dim).cumsum(dim).flip(dim)
    tail = inclusive.narrow(dim, 1, x.shape[dim] - 1)
    pad = [0, 0] * (x.dim() - 1 - (dim % x.dim())) + [0, 1]
    return F.pad(tail, pad)


def _intra_chunk(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Contribution of keys inside the same chunk. q, k, g: [..., C, K], v: [..., C, V] with C a power of two."""
    C = q.shape[-2]
    out = (q * k).sum(-1, keepdim=True) * v  # s = t: exp(0) = 1
    m = 1
    while m < C:
        # [..., C, D] -> [..., C/(2m), 2, m, D]; index 0 is a block's first half (keys), 1 its second (queries)
        def halves(x):
            return x.unflatten(-2, (C // (2 * m), 2, m))

        qh, kh, vh, gh = halves(q), halves(k), halves(v), halves(g)
        q_decayed = qh[..., 1, :, :] * gh[..., 1, :, :].cumsum(-2).exp()  # G_t - G_r, t after the midpoint r
        k_decayed = kh[..., 0, :, :] * _reverse_exclusive_cumsum(gh[..., 0, :, :], -2).exp()  # G_r - G_s
        second_half = (q_decayed @ k_decayed.transpose(-1, -2)) @ vh[..., 0, :, :]
        out = out + F.pad(second_half, (0, 0, m, 0)).flatten(-3, -2)  # first halves get nothing at this level
        m *= 2
    return out


def chunk_size_for(T: int) -> int:
    """Power of two, at most MAX_CHUNK_SIZE, not much larger than T (short sequences pad little)."""
    return min(MAX_CHUNK_SIZE, 1 << max(T - 1, 0).bit_length())


def gla_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, scale: float | None = None,
              initial_state: torch.Tensor | None = None, output_final_state: bool = False,
              chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked GLA in fla's layout: q, k, g [B, T, H, K], v [B, T, H, V], states [B, H, K, V].

    Computes in float32 whatever the input dtype (float64 inputs: in float64, which makes this a fast float64
    oracle). Returns (o [B, T, H, V] in q's dtype, final state in the compute dtype, or None). Differentiable
    through autograd in every input, initial_state included.
    """
    # Checked on CPU only: on CUDA the check would synchronise the device every call, and meta tensors hold no
    # values.
    if g.device.type == "cpu" and bool((g > 0).any()):
        raise ValueError("GLA forget gates g must be <= 0 (log-space decays, e.g. logsigmoid(x) / 16); "
                         f"got max {g.max().item():.4g}")
    # An enclosing autocast would run the matmuls below in bf16/fp16; this path is meant to be exact.
    with torch.autocast(q.device.type, enabled=False):
        return _gla_chunked(q, k, v, g, scale, initial_state, output_final_state, chunk_size)


def _gla_chunked(q, k, v, g, scale, initial_state, output_final_state, chunk_size):
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K ** -0.5 if scale is None else scale
    C = chunk_size or chunk_size_for(T)
    if C < 1 or C & (C - 1):
        raise ValueError(f"chunk_size must be a power of two, got {C}")
    n_chunks = -(-T // C)
    pad = n_chunks * C - T
    out_dtype = q.dtype
    compute_dtype = torch.promote_types(q.dtype, torch.float32)

    def to_chunks(x):
        # [B, T, H, D] -> [B, H, n_chunks, C, D] in the compute dtype. Padding the end with q = k = v = 0 and
        # g = 0 (no decay) leaves every real output and the final state unchanged.
        x = F.pad(x.to(compute_dtype).transpose(1, 2), (0, 0, 0, pad))
        return x.unflatten(2, (n_chunks, C))

    q, k, v, g = to_chunks(q) * scale, to_chunks(k), to_chunks(v), to_chunks(g)

    # Across chunks: a query sees the state at its chunk start, decayed by the gates from the chunk start to it;
    # a key enters the next state decayed by the gates after it to the chunk end.
    g_from_start = g.cumsum(-2)
    g_to_end = _reverse_exclusive_cumsum(g, -2)
    q_from_start = q * g_from_start.exp()
    chunk_kv = (k * g_to_end.exp()).transpose(-1, -2) @ v  # [B, H, n_chunks, K, V]
    chunk_decay = g_from_start[..., -1, :].exp().unsqueeze(-1)  # [B, H, n_chunks, K, 1]

    state = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(compute_dtype)
    states_before = []
    for n in range(n_chunks):
        states_before.append(state)
        state = chunk_decay[:, :, n] * state + chunk_kv[:, :, n]
    o = q_from_start @ torch.stack(states_before, dim=2) + _intra_chunk(q, k, v, g)

    o = o.flatten(2, 3)[:, :, :T].transpose(1, 2).to(out_dtype)
    return o, (state if output_final_state else None)
