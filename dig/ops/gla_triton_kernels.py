"""Triton kernels of the fused-chunk GLA (`gla_triton.py` has the math, the numerics and the autograd wrapper).

Imported only when backend="triton" is used: importing it needs Triton. Notation per chunk of BT tokens:
gc = in-chunk inclusive cumulative gate sum (<= 0, decreasing), gl = the chunk's total gate (its last gc),
q is already multiplied by the attention scale.

Row strides: q, k, v and g are read at their own token stride (STRIDE_Q, STRIDE_K, STRIDE_V, STRIDE_G elements
between consecutive tokens; H * K or H * V when contiguous), so that the columns of DiG's packed projections'
[B, T, X] output are read in place (gla_triton.py). The strides are constexprs: a contiguous call compiles to the
code it had when H * K and H * V were written in. dq, dk and dv are written at their own token stride too
(GRAD_STRIDE_K, GRAD_STRIDE_V): into the columns of one [B, T, X] gradient for packed projections (gla_gated.py).
Everything else the kernels write (o, dg, states), do and the float32 dq buffer stay contiguous.

Sums over a chunk's tokens (the gates' cumulative sum, dg's reverse one) are tensor-core products with a triangular
matrix of ones (`_token_cumsum`) for 16-bit inputs, not tl.cumsum: a scan along the token axis of a register tile
crosses threads and warps through shuffles and shared memory with barriers, and at 32 images per GPU these kernels
are bound by their instructions (the dk/dv/dg sweep: half the barriers, 8 % fewer instructions). GATE_PRECISION is
the gates' sum's input precision: "tf32" for bf16/fp16 gates (their values and the ones are exact in TF32, the
sums float32), "tf32x3" (three TF32 products of a split float32, about float32's accuracy) for float32 gates;
SUM_PRECISION, dg's (float32 values), "tf32x3". With float32 inputs both are "scan", tl.cumsum: with the dots, the
interpreter's float32 case under strong decays with a token order came out 3.1e-5 off float64 in dk, over the
2e-5 that float32 inputs are held to (tests/test_gla_triton.py) and the scan keeps. The gates must be finite: a dot
multiplies every gate by the zeros of the other rows too (0 * -inf is NaN).

Dot precision (gla_triton.DOTS_16BIT): every kernel takes two. FAST_PRECISION is for the dots that lose nothing that
matters in bf16: those whose operands are bf16 values already (dA = do v^T: v is a bf16 input, do the gradient of
the bf16 output o) and those that feed only o or dv (the forward's, except the state update when the final state
is stored; in the dk/dv/dg sweep the scores A and dv's two products). PRECISION is for the dots that feed dq, dk,
a state or a state gradient: dg is the reverse sum of q*dq - k*dk, which cancels under strong decays and magnifies
their errors (bf16 there measured dg 6-11 % off float64, BENCHMARKS.md).
"""
import triton
import triton.language as tl


@triton.jit
def _mm(a, b, PRECISION: tl.constexpr):
    """a @ b in float32: PRECISION "ieee" or "tf32" (tl.dot's input precision), or "bf16": both operands rounded
    to bf16 first (as fla's chunk kernels feed their dots), for tensor cores at twice TF32's rate;
    "bf16_rounded": the same products from bf16-rounded float32 operands (Triton's interpreter, whose dot cannot
    take bf16 tiles)."""
    if PRECISION == "bf16":  # (one return: Triton compiles the statements after a return inside an if)
        out = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
    elif PRECISION == "bf16_rounded":
        out = tl.dot(a.to(tl.bfloat16).to(tl.float32), b.to(tl.bfloat16).to(tl.float32), input_precision="ieee")
    else:
        out = tl.dot(a, b, input_precision=PRECISION)
    return out


@triton.jit
def _head(H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, NS: tl.constexpr):
    """This program's sequence i_b and head i_h, and its split's [K, V] state slot (states are [B * H, NS, K, V])."""
    i_bh = tl.program_id(0)
    o_k = tl.arange(0, BK)
    o_v = tl.arange(0, BV)
    p_s = (i_bh.to(tl.int64) * NS + tl.program_id(1)) * K * V + o_k[:, None] * V + o_v[None, :]
    m_s = (o_k[:, None] < K) & (o_v[None, :] < V)
    return (i_bh // H).to(tl.int64), i_bh % H, p_s, m_s


@triton.jit
def _split_chunks(T: tl.constexpr, BT: tl.constexpr, CPS: tl.constexpr):
    """The chunks [first, end) of this program's split: CPS chunks each, the last split may be shorter."""
    first = tl.program_id(1) * CPS
    return first, tl.minimum(first + CPS, (T + BT - 1) // BT)


@triton.jit
def _split_vector(i_s, K: tl.constexpr, BK: tl.constexpr, NS: tl.constexpr):
    """Offsets and mask of split i_s's [K] vector in a [B * H, NS, K] tensor."""
    o_k = tl.arange(0, BK)
    return (tl.program_id(0).to(tl.int64) * NS + i_s) * K + o_k, o_k < K


@triton.jit
def _load_chunk(q, k, g, v, i_t, i_b, i_h, order, T: tl.constexpr, H: tl.constexpr, K: tl.constexpr,
                V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, ORDERED: tl.constexpr,
                STRIDE_Q: tl.constexpr, STRIDE_K: tl.constexpr, STRIDE_V: tl.constexpr, STRIDE_G: tl.constexpr):
    """Chunk i_t's q, k, g and v rows as stored."""
    p_q, p_k, p_g, p_v, _, _, m_k, m_v = _chunk_offsets(i_t, i_b, i_h, order, T, H, K, V, BT, BK, BV, ORDERED,
                                                        STRIDE_Q, STRIDE_K, STRIDE_V, STRIDE_G)
    return _load_at(q, k, g, v, p_q, p_k, p_g, p_v, m_k, m_v)


@triton.jit
def _load_at(q, k, g, v, p_q, p_k, p_g, p_v, m_k, m_v):
    """q, k, g and v at a chunk's offsets (padding rows: no decay and no key)."""
    return (tl.load(q + p_q, mask=m_k, other=0.), tl.load(k + p_k, mask=m_k, other=0.),
            tl.load(g + p_g, mask=m_k, other=0.), tl.load(v + p_v, mask=m_v, other=0.))


@triton.jit
def _token_cumsum(x, PRECISION: tl.constexpr, BT: tl.constexpr, REVERSE: tl.constexpr = False):
    """Inclusive cumulative sum of a [BT, N] tile over its tokens (axis 0), or with REVERSE the sum over each token
    and those after it: one dot with a triangular matrix of ones (input precision PRECISION), or tl.cumsum when
    PRECISION is "scan"."""
    if PRECISION == "scan":
        out = tl.cumsum(x, axis=0, reverse=REVERSE)
    else:
        o_t = tl.arange(0, BT)
        if REVERSE:
            ones = (o_t[:, None] <= o_t[None, :]).to(tl.float32)
        else:
            ones = (o_t[:, None] >= o_t[None, :]).to(tl.float32)
        out = tl.dot(ones, x, input_precision=PRECISION)
    return out


@triton.jit
def _chunk_values(r_q, r_k, r_g, r_v, scale, GATE_PRECISION: tl.constexpr, BT: tl.constexpr):
    """q (scaled), k, v in float32, gc and gl of a loaded chunk."""
    b_g = r_g.to(tl.float32)
    return (r_q.to(tl.float32) * scale, r_k.to(tl.float32), r_v.to(tl.float32),
            _token_cumsum(b_g, GATE_PRECISION, BT), tl.sum(b_g, axis=0))


@triton.jit
def _chunk_rows(i_t, order, T: tl.constexpr, BT: tl.constexpr, ORDERED: tl.constexpr):
    """Scan steps i_t * BT ... of the sequence: the tokens they visit and which of them exist. With ORDERED, step s
    is the token order[s] (DiG's scan directions read in place, no reordered copy of the sequence), else token s."""
    o_t = i_t * BT + tl.arange(0, BT)
    if ORDERED:
        rows = tl.load(order + o_t, mask=o_t < T, other=0).to(tl.int64)
    else:
        rows = o_t.to(tl.int64)
    return rows, o_t < T


@triton.jit
def _tile(rows, i_b, i_h, T: tl.constexpr, STRIDE: tl.constexpr, D: tl.constexpr, BD: tl.constexpr):
    """Offsets of head i_h's [BT, BD] tile at these tokens of sequence i_b in a [B, T, H, D] tensor whose
    consecutive tokens lie STRIDE elements apart (H * D when contiguous)."""
    return i_b * T * STRIDE + i_h * D + rows[:, None] * STRIDE + tl.arange(0, BD)[None, :]


@triton.jit
def _tile_mask(m_t, D: tl.constexpr, BD: tl.constexpr):
    """Which elements of a [BT, BD] tile exist: the token's and the channel's."""
    return m_t[:, None] & (tl.arange(0, BD)[None, :] < D)


@triton.jit
def _chunk_offsets(i_t, i_b, i_h, order, T: tl.constexpr, H: tl.constexpr, K: tl.constexpr,
                   V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, ORDERED: tl.constexpr,
                   STRIDE_Q: tl.constexpr, STRIDE_K: tl.constexpr, STRIDE_V: tl.constexpr, STRIDE_G: tl.constexpr):
    """Chunk i_t's offsets in q, k, g, v (each at its own token stride), then in the contiguous [B, T, H, K] and
    [B, T, H, V] tensors (o and do, the dq buffer, dg), and the masks of K- and V-wide tiles. A contiguous input's
    offsets are the same expression as the contiguous tensors': computed once."""
    rows, m_t = _chunk_rows(i_t, order, T, BT, ORDERED)
    return _offsets_at(rows, m_t, i_b, i_h, T, H, K, V, BK, BV, STRIDE_Q, STRIDE_K, STRIDE_V, STRIDE_G)


@triton.jit
def _offsets_at(rows, m_t, i_b, i_h, T: tl.constexpr, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                BK: tl.constexpr, BV: tl.constexpr, STRIDE_Q: tl.constexpr, STRIDE_K: tl.constexpr,
                STRIDE_V: tl.constexpr, STRIDE_G: tl.constexpr):
    """_chunk_offsets at these tokens."""
    p_q = _tile(rows, i_b, i_h, T, STRIDE_Q, K, BK)
    p_k = _tile(rows, i_b, i_h, T, STRIDE_K, K, BK)
    p_g = _tile(rows, i_b, i_h, T, STRIDE_G, K, BK)
    p_v = _tile(rows, i_b, i_h, T, STRIDE_V, V, BV)
    p_k_out = _tile(rows, i_b, i_h, T, H * K, K, BK)
    p_v_out = _tile(rows, i_b, i_h, T, H * V, V, BV)
    return p_q, p_k, p_g, p_v, p_k_out, p_v_out, _tile_mask(m_t, K, BK), _tile_mask(m_t, V, BV)


@triton.jit
def _next_state(S, b_k, b_v, gc, gl, PRECISION: tl.constexpr):
    """The state after the chunk: decayed over the whole chunk, plus its keys decayed to the chunk end."""
    return S * tl.exp(gl)[:, None] + _mm(tl.trans(b_k * tl.exp(gl[None, :] - gc)), b_v, PRECISION)


@triton.jit
def _output_grad_scores(b_do, b_v, PRECISION: tl.constexpr, BT: tl.constexpr):
    """dA[i, j] = do_i . v_j for j <= i, else 0."""
    o_i = tl.arange(0, BT)
    return tl.where(o_i[:, None] >= o_i[None, :], _mm(b_do, tl.trans(b_v), PRECISION), 0.)


@triton.jit
def _row(x, j, BT: tl.constexpr):
    """Row j of a [BT, N] register tile as an [N] vector."""
    return tl.sum(tl.where((tl.arange(0, BT) == j)[:, None], x, 0.), axis=0)


@triton.jit
def _col(x, j, BT: tl.constexpr):
    """Column j of a [M, BT] register tile as an [M] vector."""
    return tl.sum(tl.where((tl.arange(0, BT) == j)[None, :], x, 0.), axis=1)


# Intra-chunk terms. Fast path (factorised): exp(gc_i - gc_j) = exp(gc_i) * exp(-gc_j), so every term is a
# tensor-core product of q~ = q e^{gc} and k~ = k e^{-gc}; this is taken when the chunk's decay is at most
# max_decay nats in every channel, so e^{-gc} stays far from float32 overflow. Otherwise (extreme gates) an exact
# loop over the chunk's keys forms each exp(gc_i - gc_j) directly with a non-positive exponent.

@triton.jit
def _scores(b_q, b_k, gc, gl, max_decay, PRECISION: tl.constexpr, BT: tl.constexpr):
    """A[i, j] = sum_k q_ik k_jk exp(gc_ik - gc_jk) for j <= i, else 0."""
    o_i = tl.arange(0, BT)
    causal = o_i[:, None] >= o_i[None, :]
    if tl.min(gl, axis=0) >= -max_decay:
        A = _mm(b_q * tl.exp(gc), tl.trans(b_k * tl.exp(-gc)), PRECISION)
    else:
        A = tl.zeros([BT, BT], dtype=tl.float32)
        for j in range(0, BT):
            k_j, gc_j = _row(b_k, j, BT), _row(gc, j, BT)
            a_j = tl.sum(b_q * k_j[None, :] * tl.exp(tl.minimum(gc - gc_j[None, :], 0.)), axis=1)
            A = tl.where((o_i == j)[None, :], a_j[:, None], A)
    return tl.where(causal, A, 0.)


@triton.jit
def _scores_grad_q(dA, b_k, gc, gl, max_decay, PRECISION: tl.constexpr, BT: tl.constexpr):
    """dq_i = sum_{j <= i} dA_ij k_j exp(gc_i - gc_j), for dA already zero above the diagonal."""
    if tl.min(gl, axis=0) >= -max_decay:
        dq = _mm(dA, b_k * tl.exp(-gc), PRECISION) * tl.exp(gc)
    else:
        dq = tl.zeros(b_k.shape, dtype=tl.float32)
        for j in range(0, BT):
            k_j, gc_j = _row(b_k, j, BT), _row(gc, j, BT)
            dq += _col(dA, j, BT)[:, None] * k_j[None, :] * tl.exp(tl.minimum(gc - gc_j[None, :], 0.))
    return dq


@triton.jit
def _scores_grad_k(dA, b_q, gc, gl, max_decay, PRECISION: tl.constexpr, BT: tl.constexpr):
    """dk_j = sum_{i >= j} dA_ij q_i exp(gc_i - gc_j), for dA already zero above the diagonal."""
    o_i = tl.arange(0, BT)
    if tl.min(gl, axis=0) >= -max_decay:
        dk = _mm(tl.trans(dA), b_q * tl.exp(gc), PRECISION) * tl.exp(-gc)
    else:
        dk = tl.zeros(b_q.shape, dtype=tl.float32)
        for j in range(0, BT):
            gc_j = _row(gc, j, BT)
            dk_j = tl.sum(_col(dA, j, BT)[:, None] * b_q * tl.exp(tl.minimum(gc - gc_j[None, :], 0.)), axis=0)
            dk = tl.where((o_i == j)[:, None], dk_j[None, :], dk)
    return dk


@triton.jit
def fwd_kernel(q, k, v, g, o, h0, ht, order, scale, max_decay,
               T: tl.constexpr, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
               BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr,
               FAST_PRECISION: tl.constexpr, GATE_PRECISION: tl.constexpr, USE_H0: tl.constexpr,
               STORE_HT: tl.constexpr, NS: tl.constexpr,
               CPS: tl.constexpr, ORDERED: tl.constexpr, STRIDE_Q: tl.constexpr, STRIDE_K: tl.constexpr,
               STRIDE_V: tl.constexpr, STRIDE_G: tl.constexpr, PREFETCH: tl.constexpr = False):
    """Outputs of one split of the sequence (the whole sequence when NS = 1), from its state at the start."""
    i_b, i_h, p_s, m_s = _head(H, K, V, BK, BV, NS)
    if USE_H0:
        S = tl.load(h0 + p_s, mask=m_s, other=0.).to(tl.float32)
    else:
        S = tl.zeros([BK, BV], dtype=tl.float32)
    first, end = _split_chunks(T, BT, CPS)
    if PREFETCH:
        n_q, n_k, n_g, n_v = _load_chunk(q, k, g, v, first, i_b, i_h, order, T, H, K, V, BT, BK, BV, ORDERED,
                                         STRIDE_Q, STRIDE_K, STRIDE_V, STRIDE_G)
    for i_t in range(first, end):
        p_q, p_k, p_g, p_v, _, p_o, m_k, m_v = _chunk_offsets(i_t, i_b, i_h, order, T, H, K, V, BT, BK, BV, ORDERED,
                                                              STRIDE_Q, STRIDE_K, STRIDE_V, STRIDE_G)
        if PREFETCH:  # the next chunk's loads are in flight while this one computes
            r_q, r_k, r_g, r_v = n_q, n_k, n_g, n_v
            n_q, n_k, n_g, n_v = _load_chunk(q, k, g, v, tl.minimum(i_t + 1, end - 1), i_b, i_h, order,
                                             T, H, K, V, BT, BK, BV, ORDERED, STRIDE_Q, STRIDE_K, STRIDE_V, STRIDE_G)
        else:
            r_q, r_k, r_g, r_v = _load_at(q, k, g, v, p_q, p_k, p_g, p_v, m_k, m_v)
        b_q, b_k, b_v, gc, gl = _chunk_values(r_q, r_k, r_g, r_v, scale, GATE_PRECISION, BT)
        A = _scores(b_q, b_k, gc, gl, max_decay, FAST_PRECISION, BT)
        b_o = _mm(A, b_v, FAST_PRECISION) + _mm(b_q * tl.exp(gc), S, FAST_PRECISION)
        tl.store(o + p_o, b_o.to(o.dtype.element_ty), mask=m_v)
        if STORE_HT:  # the final state is an output (a later call's initial state): built as the backward's
            S = _next_state(S, b_k, b_v, gc, gl, PRECISION)
        else:
            S = _next_state(S, b_k, b_v, gc, gl, FAST_PRECISION)
    if STORE_HT:
        tl.store(ht + p_s, S, mask=m_s)


@triton.jit
def bwd_dq_kernel(q, k, v, g, do, dq, dht, final_dg, h0, order, scale, max_decay,
                  T: tl.constexpr, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                  BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr,
                  FAST_PRECISION: tl.constexpr, GATE_PRECISION: tl.constexpr, USE_H0: tl.constexpr,
                  USE_DHT: tl.constexpr, NS: tl.constexpr,
                  CPS: tl.constexpr, ORDERED: tl.constexpr, STRIDE_Q: tl.constexpr, STRIDE_K: tl.constexpr,
                  STRIDE_V: tl.constexpr, STRIDE_G: tl.constexpr):
    """Forward sweep over one split: dq in float32 and, with a final-state gradient (NS = 1 only), the
    gate-gradient term sum_v S_T * dS_T that every position's dg receives."""
    i_b, i_h, p_s, m_s = _head(H, K, V, BK, BV, NS)
    if USE_H0:
        S = tl.load(h0 + p_s, mask=m_s, other=0.).to(tl.float32)
    else:
        S = tl.zeros([BK, BV], dtype=tl.float32)
    first, end = _split_chunks(T, BT, CPS)
    for i_t in range(first, end):
        p_q, p_k, p_g, p_v, p_dq, p_do, m_k, m_v = _chunk_offsets(i_t, i_b, i_h, order, T, H, K, V, BT, BK, BV,
                                                                  ORDERED, STRIDE_Q, STRIDE_K, STRIDE_V, STRIDE_G)
        r_q, r_k, r_g, r_v = _load_at(q, k, g, v, p_q, p_k, p_g, p_v, m_k, m_v)
        b_q, b_k, b_v, gc, gl = _chunk_values(r_q, r_k, r_g, r_v, scale, GATE_PRECISION, BT)
        b_do = tl.load(do + p_do, mask=m_v, other=0.).to(tl.float32)
        dA = _output_grad_scores(b_do, b_v, FAST_PRECISION, BT)
        b_dq = _scores_grad_q(dA, b_k, gc, gl, max_decay, PRECISION, BT)
        b_dq += _mm(b_do, tl.trans(S), PRECISION) * tl.exp(gc)
        tl.store(dq + p_dq, b_dq * scale, mask=m_k)
        S = _next_state(S, b_k, b_v, gc, gl, PRECISION)
    if USE_DHT:
        o_k = tl.arange(0, BK)
        b_dht = tl.load(dht + p_s, mask=m_s, other=0.).to(tl.float32)
        tl.store(final_dg + tl.program_id(0).to(tl.int64) * K + o_k, tl.sum(S * b_dht, axis=1), mask=o_k < K)


@triton.jit
def bwd_dkv_kernel(q, k, v, g, do, dq, dq_out, dk, dv, dg, dht, final_dg, dh0, dgsum, order, scale, max_decay,
                   T: tl.constexpr, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                   BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr,
                   FAST_PRECISION: tl.constexpr, GATE_PRECISION: tl.constexpr, SUM_PRECISION: tl.constexpr,
                   USE_DHT: tl.constexpr, STORE_DH0: tl.constexpr, NS: tl.constexpr,
                   CPS: tl.constexpr, ORDERED: tl.constexpr, STRIDE_Q: tl.constexpr, STRIDE_K: tl.constexpr,
                   STRIDE_V: tl.constexpr, STRIDE_G: tl.constexpr, GRAD_STRIDE_K: tl.constexpr,
                   GRAD_STRIDE_V: tl.constexpr):
    """Reverse sweep over one split: dk, dv, and dg as the reverse cumulative sum of q*dq - k*dk; dq from the dq
    sweep's float32 buffer, stored in dq_out's dtype. dq_out and dk are written at token stride GRAD_STRIDE_K, dv
    at GRAD_STRIDE_V (H * K and H * V when contiguous; the row width of one packed q|k|v|gate gradient otherwise).
    The state gradient at the split's end comes from dht ([B * H, NS, K, V]); with NS > 1 the split's dg lacks the
    sum of q*dq - k*dk over the splits after it, and that split total is stored in dgsum for the caller to add."""
    i_b, i_h, p_s, m_s = _head(H, K, V, BK, BV, NS)
    o_k = tl.arange(0, BK)
    if USE_DHT:
        dS = tl.load(dht + p_s, mask=m_s, other=0.).to(tl.float32)
    else:
        dS = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_DHT and NS == 1:
        dg_after = tl.load(final_dg + tl.program_id(0).to(tl.int64) * K + o_k, mask=o_k < K, other=0.)
    else:
        dg_after = tl.zeros([BK], dtype=tl.float32)
    first, end = _split_chunks(T, BT, CPS)
    for i_r in range(0, end - first):
        rows, m_t = _chunk_rows(end - 1 - i_r, order, T, BT, ORDERED)
        p_q, p_k, p_g, p_v, p_kc, p_vc, m_k, m_v = _offsets_at(rows, m_t, i_b, i_h, T, H, K, V, BK, BV,
                                                               STRIDE_Q, STRIDE_K, STRIDE_V, STRIDE_G)
        p_dk = _tile(rows, i_b, i_h, T, GRAD_STRIDE_K, K, BK)
        p_dv = _tile(rows, i_b, i_h, T, GRAD_STRIDE_V, V, BV)
        r_q, r_k, r_g, r_v = _load_at(q, k, g, v, p_q, p_k, p_g, p_v, m_k, m_v)
        b_q, b_k, b_v, gc, gl = _chunk_values(r_q, r_k, r_g, r_v, scale, GATE_PRECISION, BT)
        b_do = tl.load(do + p_vc, mask=m_v, other=0.).to(tl.float32)
        to_end = tl.exp(gl[None, :] - gc)
        A = _scores(b_q, b_k, gc, gl, max_decay, FAST_PRECISION, BT)
        dA = _output_grad_scores(b_do, b_v, FAST_PRECISION, BT)
        b_dk = _scores_grad_k(dA, b_q, gc, gl, max_decay, PRECISION, BT)
        b_dk += _mm(b_v, tl.trans(dS), PRECISION) * to_end
        b_dv = _mm(tl.trans(A), b_do, FAST_PRECISION) + _mm(b_k * to_end, dS, FAST_PRECISION)
        tl.store(dk + p_dk, b_dk.to(dk.dtype.element_ty), mask=m_k)
        tl.store(dv + p_dv, b_dv.to(dv.dtype.element_ty), mask=m_v)
        b_dq = tl.load(dq + p_kc, mask=m_k, other=0.)  # gradient of the unscaled q
        tl.store(dq_out + p_dk, b_dq.to(dq_out.dtype.element_ty), mask=m_k)
        dG = b_q / scale * b_dq - b_k * b_dk
        b_dg = _token_cumsum(dG, SUM_PRECISION, BT, REVERSE=True) + dg_after[None, :]
        tl.store(dg + p_kc, b_dg.to(dg.dtype.element_ty), mask=m_k)
        dg_after += tl.sum(dG, axis=0)
        dS = dS * tl.exp(gl)[:, None] + _mm(tl.trans(b_q * tl.exp(gc)), b_do, PRECISION)
    if STORE_DH0:
        tl.store(dh0 + p_s, dS, mask=m_s)
    if NS > 1:
        p_g, m_g = _split_vector(tl.program_id(1), K, BK, NS)
        tl.store(dgsum + p_g, dg_after, mask=m_g)


# The sequence split across programs (few sequences x heads for the GPU's SMs): each split's own contribution to
# the state (split_states_kernel forwards, split_state_grads_kernel backwards), a scan over the splits
# (split_scan_kernel), then the kernels above per split from the state (gradient) the scan gives it.

@triton.jit
def split_states_kernel(k, v, g, states, gsum, order,
                        T: tl.constexpr, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                        BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr,
                        GATE_PRECISION: tl.constexpr, NS: tl.constexpr, CPS: tl.constexpr, ORDERED: tl.constexpr,
                        STRIDE_K: tl.constexpr, STRIDE_V: tl.constexpr, STRIDE_G: tl.constexpr):
    """The state at a split's end from a zero state at its start, and the split's total gate per channel."""
    i_b, i_h, p_s, m_s = _head(H, K, V, BK, BV, NS)
    S = tl.zeros([BK, BV], dtype=tl.float32)
    g_total = tl.zeros([BK], dtype=tl.float32)
    first, end = _split_chunks(T, BT, CPS)
    for i_t in range(first, end):
        rows, m_t = _chunk_rows(i_t, order, T, BT, ORDERED)
        m_k, m_v = _tile_mask(m_t, K, BK), _tile_mask(m_t, V, BV)
        b_k = tl.load(k + _tile(rows, i_b, i_h, T, STRIDE_K, K, BK), mask=m_k, other=0.).to(tl.float32)
        b_g = tl.load(g + _tile(rows, i_b, i_h, T, STRIDE_G, K, BK), mask=m_k, other=0.).to(tl.float32)
        b_v = tl.load(v + _tile(rows, i_b, i_h, T, STRIDE_V, V, BV), mask=m_v, other=0.).to(tl.float32)
        gl = tl.sum(b_g, axis=0)
        S = _next_state(S, b_k, b_v, _token_cumsum(b_g, GATE_PRECISION, BT), gl, PRECISION)
        g_total += gl
    tl.store(states + p_s, S, mask=m_s)
    p_g, m_g = _split_vector(tl.program_id(1), K, BK, NS)
    tl.store(gsum + p_g, g_total, mask=m_g)


@triton.jit
def split_state_grads_kernel(q, g, do, dstates, order, scale,
                             T: tl.constexpr, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                             BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr,
                             GATE_PRECISION: tl.constexpr, NS: tl.constexpr, CPS: tl.constexpr,
                             ORDERED: tl.constexpr, STRIDE_Q: tl.constexpr,
                             STRIDE_G: tl.constexpr):
    """The gradient of the state at a split's start from the split's own outputs."""
    i_b, i_h, p_s, m_s = _head(H, K, V, BK, BV, NS)
    dS = tl.zeros([BK, BV], dtype=tl.float32)
    first, end = _split_chunks(T, BT, CPS)
    for i_r in range(0, end - first):
        rows, m_t = _chunk_rows(end - 1 - i_r, order, T, BT, ORDERED)
        m_k, m_v = _tile_mask(m_t, K, BK), _tile_mask(m_t, V, BV)
        b_q = tl.load(q + _tile(rows, i_b, i_h, T, STRIDE_Q, K, BK), mask=m_k, other=0.).to(tl.float32) * scale
        b_g = tl.load(g + _tile(rows, i_b, i_h, T, STRIDE_G, K, BK), mask=m_k, other=0.).to(tl.float32)
        b_do = tl.load(do + _tile(rows, i_b, i_h, T, H * V, V, BV), mask=m_v, other=0.).to(tl.float32)
        gc = _token_cumsum(b_g, GATE_PRECISION, BT)
        dS = dS * tl.exp(tl.sum(b_g, axis=0))[:, None] + _mm(tl.trans(b_q * tl.exp(gc)), b_do, PRECISION)
    tl.store(dstates + p_s, dS, mask=m_s)


@triton.jit
def split_scan_kernel(local, gsum, out, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                      NS: tl.constexpr, REVERSE: tl.constexpr):
    """Forwards: out[s] = the state at split s's start, sum over r < s of local[r] decayed by the splits between.
    Reverse: out[s] = the state gradient at split s's end, from local[r] of every r > s."""
    o_k = tl.arange(0, BK)
    o_v = tl.arange(0, BV)
    m_s = (o_k[:, None] < K) & (o_v[None, :] < V)
    S = tl.zeros([BK, BV], dtype=tl.float32)
    for i in range(0, NS):
        if REVERSE:
            i_s = NS - 1 - i
        else:
            i_s = i
        p_s = (tl.program_id(0).to(tl.int64) * NS + i_s) * K * V + o_k[:, None] * V + o_v[None, :]
        tl.store(out + p_s, S, mask=m_s)
        p_g, m_g = _split_vector(i_s, K, BK, NS)
        decay = tl.exp(tl.load(gsum + p_g, mask=m_g, other=0.))
        S = S * decay[:, None] + tl.load(local + p_s, mask=m_s, other=0.)
