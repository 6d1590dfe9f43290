"""Fused-chunk gated linear attention in Triton, tuned for DiG's small heads (K <= 64, V <= 128).

One program per (batch, head) walks the sequence in chunks of CHUNK tokens and keeps the whole [K, V] state in
registers, so the forward is one kernel that reads q, k, v, g once and writes o once, and the backward is two
(a forward sweep for dq, a reverse sweep for dk, dv, dg). Nothing but the inputs is saved for backward.

Long sequences, few of them (high resolution, 1-2 images per GPU: batch x heads below the GPU's SM count): the
sequence is split across programs. Each split's own end state (zero state at its start) and total gate come from
one pass over k, v, g; a scan over the splits gives every split its start state; then the kernels above run per
split from that state. Backwards likewise, with the state gradient scanned in reverse, and dg's carry over the
later splits added at the end. Without states only (DiG's case); `splits` forces a count, else it is chosen from
the shapes and the SM count.

Numerics. Across chunks a query is decayed from the chunk start and a key to the chunk end: every exponent is
<= 0. Inside a chunk the decay between query i and key j <= i, exp(G_i - G_j) with G the in-chunk cumulative
gate, is factorised as exp(G_i) * exp(-G_j) so that all intra-chunk terms are tensor-core products; that is
exact in float32 while the chunk's total decay stays below FACTORISED_MAX_DECAY nats in every channel (DiG's
gates, logsigmoid(x)/16, decay a few nats per chunk). A chunk with stronger decay takes an exact per-key loop
whose exponents are all <= 0 (slower, only for extreme gates). Dots run in IEEE float32 for float32 inputs and
in TF32 for bf16/fp16 inputs (bf16 values are exact in TF32; the state and every gate stay in float32); with bf16
inputs, DOTS_16BIT takes the dots that cannot reach the gate gradient on bf16 operands (see there).

Backward. With G_t the cumulative gate over the whole sequence, o_t = sum_{s<=t} (q_t e^{G_t - G_s} . k_s) v_s
(+ q_t e^{G_t} S_0), so dL/dG_t = q_t * dq_t - k_t * dk_t (+ S_T * dS_T summed over V at t = T), and
dg_s = sum_{t>=s} dL/dG_t: a reverse cumulative sum that the reverse sweep carries across chunks.

Token order. `token_order` (a permutation of range(T)) makes step s of the recurrence the token order[s]: every
kernel reads and writes the rows at those tokens, so DiG's four scan directions need no reordered copy of the
sequence (DiG's scan_in_kernel).

Row-strided inputs. q, k, v and g are read at their own token stride: a [B, T, H, D] view whose heads and channels
are packed (strides (T * S, S, D, 1), S >= H * D) is read in place. DiG computes q, k, v and the output gate as one
GEMM and hands its [B, T, X] output to gla_gated.py; copying the columns to contiguous tensors cost 2.9 ms per
DiG-XL/2 training step on an H200, more than one GEMM saved. Other layouts, and views the kernels' vector loads
could not read aligned, are copied first (`_rows_in_place`, `token_rows.py`). Each stride is a compile-time
constant of the kernels: a contiguous call compiles to the code it had before strides existed, a new X compiles
once more. The backward writes dq, dk, dv into given views (`grads_into`: the columns of one gradient) or new
contiguous tensors. o and dg are always contiguous.

The reference is `gla_torch.py` (exact, float32/float64); tests run these kernels on GPUs and, through Triton's
interpreter (TRITON_INTERPRET=1), on the CPU.
"""
from __future__ import annotations

import functools
import importlib.util
import os

import torch

from .token_rows import in_token_rows, readable_in_place, token_stride

CHUNK = 16
NUM_WARPS = 4
# Launch options per kernel when a call has at least BUSY_PROGRAMS_PER_SM programs per SM (DiG-XL/2 at 32 images
# per GPU: 576 programs for 132 SMs). Then how many programs an SM holds at once (registers x threads) and the
# latency of each chunk's loads decide the time: the forward and the dq sweep in one warp each (0.84-0.88x and
# 0.96-0.97x the time of the earlier 4 warps capped at 96 registers with loads a chunk ahead, and of 4 warps, with
# the `mixed` dots; 0.71x / 0.94x at 128 images), the dk/dv/dg sweep in 2 warps. Measured per kernel in rotating
# rounds by bench.tune_gla_launch (BENCHMARKS.md, 2026-11-30); with fewer programs per SM (high resolution,
# sequence splits) these lose and NUM_WARPS alone runs.
BUSY_PROGRAMS_PER_SM = 4
LAUNCH_BUSY: dict[str, dict] = {"fwd": {"num_warps": 1}, "bwd_dq": {"num_warps": 1}, "bwd_dkv": {"num_warps": 2}}
# kernel -> its whole launch option set, replacing the above (benchmarks, tests). Its dots follow DOTS_16BIT below
# unless it sets PRECISION (bench.tune_gla_launch's `t`, `m`, `b` option sets), FAST_PRECISION following PRECISION
# when unset.
LAUNCH_OVERRIDE: dict[str, dict] = {}
KERNELS = ("fwd", "bwd_dq", "bwd_dkv")
# A dots mode -> (PRECISION, FAST_PRECISION) of a kernel with bf16 inputs (gla_triton_kernels.py says which dots
# take which): all TF32; "mixed": bf16 operands where that loses nothing that matters (dots on bf16 values, dots
# feeding only o or dv), TF32 for those feeding dq, dk, a stored final state and the state gradients; all bf16 (as
# fla's chunk kernels; the sequence-split kernels keep TF32 in every mode).
DOT_MODES = {"tf32": ("tf32", "tf32"), "mixed": ("tf32", "bf16"), "bf16": ("bf16", "bf16")}


def dots_16bit(spec: str) -> dict[str, str]:
    """Each kernel's dots mode for bf16 inputs from one of DOT_MODES (every kernel) or "KERNEL=MODE,..." (the
    others tf32), e.g. "fwd=bf16,bwd_dkv=mixed"."""
    if spec in DOT_MODES:
        return dict.fromkeys(KERNELS, spec)
    out = dict.fromkeys(KERNELS, "tf32")
    for part in spec.split(","):
        kernel, _, mode = part.partition("=")
        if kernel not in KERNELS or mode not in DOT_MODES:
            raise ValueError(f"DIG_GLA_DOTS_16BIT: {part!r} in {spec!r} is not KERNEL=MODE with KERNEL one of "
                             f"{', '.join(KERNELS)} and MODE one of {', '.join(DOT_MODES)}")
        out[kernel] = mode
    return out


# The dots' mode for bf16 inputs, per kernel (fp16 inputs always take TF32: fp16 values are not exact in bf16).
# bf16 operands run at twice TF32's tensor-core rate. "mixed" (default) took DiG-XL/2's GLA kernels from 50.5 to
# 45.9 ms per step at 1024 px and 8.1 to 7.1 at 256 px / 32 with dg as accurate as TF32's; bf16 everywhere (42.4,
# 6.7) leaves dg 6-11 % off the float64 oracle under strong decays (BENCHMARKS.md, tenth session).
# DIG_GLA_DOTS_16BIT=tf32, bf16 or e.g. fwd=bf16,bwd_dkv=mixed measures the others.
DOTS_16BIT_SPEC = os.environ.get("DIG_GLA_DOTS_16BIT") or "mixed"  # as given (training runs tag it in MLflow)
DOTS_16BIT = dots_16bit(DOTS_16BIT_SPEC)
FACTORISED_MAX_DECAY = 40.0
MAX_K = 64
MAX_V = 128
PROGRAMS_PER_SM = 2  # automatic splits aim at this many programs per SM
MIN_SPLIT_CHUNKS = 8  # and leave every split at least this many chunks (shorter: the extra passes dominate)


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


@functools.lru_cache(maxsize=None)
def _split_kernels():
    from . import gla_triton_kernels as kern

    return kern.split_states_kernel, kern.split_state_grads_kernel, kern.split_scan_kernel


def automatic_splits(sequences_heads: int, tokens: int, sm_count: int) -> int:
    """Splits of each sequence so that batch x heads x splits gives every SM PROGRAMS_PER_SM programs, with no
    split shorter than MIN_SPLIT_CHUNKS chunks; 1 when batch x heads alone fills the SMs."""
    if sequences_heads >= sm_count:
        return 1
    wanted = -(-PROGRAMS_PER_SM * sm_count // sequences_heads)
    return max(1, min(wanted, _chunks(tokens) // MIN_SPLIT_CHUNKS))


def _chunks(tokens: int) -> int:
    return -(-tokens // CHUNK)


def _split_layout(tokens: int, splits: int) -> tuple[int, int]:
    """(number of splits, chunks per split) for at most `splits` splits of equal length (the last may be shorter)."""
    per_split = -(-_chunks(tokens) // max(1, splits))
    return -(-_chunks(tokens) // per_split), per_split


_sm_counts: dict[int, int] = {}


@torch._dynamo.assume_constant_result
def sm_count_of(device: torch.device) -> int:
    """The CUDA device's SM count, looked up once per device (a constant to dynamo)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _sm_counts:
        _sm_counts[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _sm_counts[index]


def _splits_for(q: torch.Tensor, splits: int) -> int:
    if splits > 0:
        return splits
    if not q.is_cuda:  # Triton's interpreter: one program per sequence and head unless told otherwise
        return 1
    B, T, H, _ = q.shape
    return automatic_splits(B * H, T, sm_count_of(q.device))


def _launch_args(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, splits: int = 1,
                 order: torch.Tensor | None = None) -> dict:
    B, T, H, K = q.shape
    NS, CPS = _split_layout(T, splits)
    return dict(T=T, H=H, K=K, V=v.shape[-1], BT=CHUNK, BK=_block(K), BV=_block(v.shape[-1]),
                PRECISION=_precision(q), GATE_PRECISION=_token_sum_precisions(q, g)[0], NS=NS, CPS=CPS,
                ORDERED=order is not None, STRIDE_Q=token_stride(q), STRIDE_K=token_stride(k),
                STRIDE_V=token_stride(v), STRIDE_G=token_stride(g))


def _token_sum_precisions(q: torch.Tensor, g: torch.Tensor) -> tuple[str, str]:
    """The precisions of the sums over a chunk's tokens (gla_triton_kernels._token_cumsum), the gates' and dg's:
    tl.cumsum ("scan") with float32 inputs; dots otherwise, exact TF32 for 16-bit gates, three TF32 products for
    float32 values (float32 gates, dg)."""
    if q.dtype == torch.float32:
        return "scan", "scan"
    return ("tf32" if g.dtype in (torch.bfloat16, torch.float16) else "tf32x3"), "tf32x3"


def _rows_in_place(x: torch.Tensor) -> torch.Tensor:
    """x itself if the kernels can read it where it is (contiguous, or a column slice of packed projections:
    `token_rows.readable_in_place`), else a contiguous copy."""
    return x if x.is_contiguous() or readable_in_place(x) else x.contiguous()


def _only(args: dict, *names: str) -> dict:
    """The launch arguments without the strides of the inputs that a kernel does not take."""
    return {key: value for key, value in args.items() if key not in names}


def _options(kernel: str, q: torch.Tensor, programs: int) -> dict:
    if kernel in LAUNCH_OVERRIDE:
        options = dict(LAUNCH_OVERRIDE[kernel])
    else:
        options = {"num_warps": NUM_WARPS}
        if q.is_cuda and programs >= BUSY_PROGRAMS_PER_SM * sm_count_of(q.device):
            options.update(LAUNCH_BUSY[kernel])
    if q.dtype == torch.bfloat16 and "PRECISION" not in options:
        options["PRECISION"], options["FAST_PRECISION"] = DOT_MODES[DOTS_16BIT[kernel]]
    options.setdefault("FAST_PRECISION", options.get("PRECISION", _precision(q)))
    if _INTERPRETED:  # the interpreter's dot reads bf16 tiles as raw bits
        for key in ("PRECISION", "FAST_PRECISION"):
            if options.get(key) == "bf16":
                options[key] = "bf16_rounded"
    return options


def _precision(q: torch.Tensor) -> str:
    """The dots' precision for q's dtype unless told otherwise: IEEE float32 for float32, else TF32 (bf16 and fp16
    values are exact in TF32)."""
    return "ieee" if q.dtype == torch.float32 else "tf32"


def _block(n: int) -> int:
    return max(16, 1 << (n - 1).bit_length())


def _forward(q, k, v, g, scale, h0, output_final_state, splits=1, order=None):
    fwd, _, _ = _kernels()
    B, T, H, K = q.shape
    args = _launch_args(q, k, v, g, splits, order)
    o = torch.empty_like(v, dtype=q.dtype, memory_format=torch.contiguous_format)
    ht = q.new_empty(B, H, K, v.shape[-1], dtype=torch.float32) if output_final_state else None
    if args["NS"] > 1:
        h0 = _split_start_states(k, v, g, order, args)[0]
    fwd[(B * H, args["NS"])](q, k, v, g, o, h0, ht, order, scale, FACTORISED_MAX_DECAY, USE_H0=h0 is not None,
                             STORE_HT=output_final_state, **{**args, **_options("fwd", q, B * H * args["NS"])})
    return o, ht


def _split_start_states(k, v, g, order, args):
    """Every split's state at its start ([B * H, NS, K, V]) and every split's total gate ([B * H, NS, K])."""
    states_kernel, _, scan = _split_kernels()
    B, T, H, K = k.shape
    NS = args["NS"]
    local = k.new_empty(B * H, NS, K, v.shape[-1], dtype=torch.float32)
    gsum = k.new_empty(B * H, NS, K, dtype=torch.float32)
    states_kernel[(B * H, NS)](k, v, g, local, gsum, order, **_only(args, "STRIDE_Q"), num_warps=NUM_WARPS)
    starts = torch.empty_like(local)
    scan[(B * H,)](local, gsum, starts, K=K, V=v.shape[-1], BK=args["BK"], BV=args["BV"], NS=NS, REVERSE=False,
                   num_warps=NUM_WARPS)
    return starts, gsum


def _split_end_state_grads(q, g, do, gsum, order, scale, args):
    """The gradient of every split's state at its end from the outputs of the splits after it."""
    _, grads_kernel, scan = _split_kernels()
    B, T, H, K = q.shape
    NS, V = args["NS"], do.shape[-1]
    local = q.new_empty(B * H, NS, K, V, dtype=torch.float32)
    grads_kernel[(B * H, NS)](q, g, do, local, order, scale, **_only(args, "STRIDE_K", "STRIDE_V"),
                              num_warps=NUM_WARPS)
    ends = torch.empty_like(local)
    scan[(B * H,)](local, gsum, ends, K=K, V=V, BK=args["BK"], BV=args["BV"], NS=NS, REVERSE=True,
                   num_warps=NUM_WARPS)
    return ends


def _backward(q, k, v, g, h0, scale, do, dht, need_dh0, splits=1, order=None, grads_into=None):
    """dq, dk, dv, dg, dh0. grads_into: three [B, T, H, D] views that receive dq, dk and dv (the columns of one
    gradient when q, k and v came packed in one tensor, gla_gated.py; token_rows.in_token_rows layouts), else new
    tensors."""
    if grads_into is not None:
        _check_grads_into(grads_into, q, v)
    _, bwd_dq, bwd_dkv = _kernels()
    B, T, H, K = q.shape
    do = do.contiguous()
    dht = dht.contiguous() if dht is not None else None
    args = _launch_args(q, k, v, g, splits, order)
    NS = args["NS"]
    dq = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    final_dg = torch.empty(B, H, K, dtype=torch.float32, device=q.device) if dht is not None else None
    dgsum = None
    if NS > 1:  # stateless only (h0 and dht are None)
        h0, gsum = _split_start_states(k, v, g, order, args)
        dht = _split_end_state_grads(q, g, do, gsum, order, scale, args)
        dgsum = q.new_empty(B * H, NS, K, dtype=torch.float32)
    bwd_dq[(B * H, NS)](q, k, v, g, do, dq, dht, final_dg, h0, order, scale, FACTORISED_MAX_DECAY,
                        USE_H0=h0 is not None, USE_DHT=dht is not None and NS == 1,
                        **{**args, **_options("bwd_dq", q, B * H * NS)})
    contiguous = torch.contiguous_format
    if grads_into is None:
        dq_out, dk, dv = (torch.empty_like(x, memory_format=contiguous) for x in (q, k, v))
    else:
        dq_out, dk, dv = grads_into
    dg = torch.empty_like(g, dtype=torch.float32 if NS > 1 else g.dtype, memory_format=contiguous)
    dh0 = torch.empty_like(h0, dtype=torch.float32) if h0 is not None and need_dh0 and NS == 1 else None
    bwd_dkv[(B * H, NS)](q, k, v, g, do, dq, dq_out, dk, dv, dg, dht, final_dg, dh0, dgsum, order, scale,
                         FACTORISED_MAX_DECAY,
                         SUM_PRECISION=_token_sum_precisions(q, g)[1],
                         USE_DHT=dht is not None, STORE_DH0=dh0 is not None, GRAD_STRIDE_K=token_stride(dk),
                         GRAD_STRIDE_V=token_stride(dv), **{**args, **_options("bwd_dkv", q, B * H * NS)})
    if NS > 1:  # each split's dg still lacks the sum of q*dq - k*dk over the splits after it
        after = dgsum.flip(1).cumsum(1).flip(1) - dgsum
        per_step = after.view(B, H, NS, K).transpose(1, 2).repeat_interleave(args["CPS"] * CHUNK, dim=1)[:, :T]
        if order is not None:  # scan step s is token order[s]
            per_step = per_step.index_select(1, inverse_order(order))
        dg = (dg + per_step).to(g.dtype)
    return dq_out, dk, dv, dg, dh0


class _FusedChunkGLA(torch.autograd.Function):
    """With states (initial and/or final): an autograd Function, run eagerly."""

    @staticmethod
    def forward(ctx, q, k, v, g, scale, initial_state, output_final_state, order):
        o, ht = _forward(q, k, v, g, scale, initial_state, output_final_state, order=order)
        ctx.save_for_backward(q, k, v, g, initial_state, order)
        ctx.scale = scale
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, h0, order = ctx.saved_tensors
        dq, dk, dv, dg, dh0 = _backward(q, k, v, g, h0, ctx.scale, do, dht, ctx.needs_input_grad[5], order=order)
        return dq, dk, dv, dg, None, dh0, None, None


# Without states (DiG's case): registered operators, so that torch.compile keeps them inside a block's graph
# (an autograd Function with Triton launches would split the graph in two around every GLA call).
@torch.library.custom_op("dig::gla_fused_chunk", mutates_args=())
def gla_fused_chunk(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                    scale: float, splits: int = 0, order: torch.Tensor | None = None) -> torch.Tensor:
    q, k, v, g = (_rows_in_place(x) for x in (q, k, v, g))
    return _forward(q, k, v, g, scale, None, False, _splits_for(q, splits), order)[0]


@gla_fused_chunk.register_fake
def _(q, k, v, g, scale, splits=0, order=None):
    return torch.empty_like(v, dtype=q.dtype, memory_format=torch.contiguous_format)


@torch.library.custom_op("dig::gla_fused_chunk_backward", mutates_args=())
def gla_fused_chunk_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                             do: torch.Tensor, scale: float, splits: int = 0,
                             order: torch.Tensor | None = None) -> tuple[
                                 torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v, g = (_rows_in_place(x) for x in (q, k, v, g))  # the forward's inputs, saved as they came
    return _backward(q, k, v, g, None, scale, do, None, False, _splits_for(q, splits), order)[:4]


@gla_fused_chunk_backward.register_fake
def _(q, k, v, g, do, scale, splits=0, order=None):
    return tuple(torch.empty_like(x, memory_format=torch.contiguous_format) for x in (q, k, v, g))


def _setup_context(ctx, inputs, output):
    q, k, v, g, scale, splits, order = inputs
    ctx.save_for_backward(q, k, v, g, order)
    ctx.scale, ctx.splits = scale, splits


def _gla_fused_chunk_grad(ctx, do):
    q, k, v, g, order = ctx.saved_tensors
    return (*torch.ops.dig.gla_fused_chunk_backward(q, k, v, g, do, ctx.scale, ctx.splits, order), None, None, None)


gla_fused_chunk.register_autograd(_gla_fused_chunk_grad, setup_context=_setup_context)


def gla_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, scale: float | None = None,
               initial_state: torch.Tensor | None = None, output_final_state: bool = False,
               splits: int | None = None, token_order: torch.Tensor | None = None):
    """Fused-chunk GLA in `[B, T, H, K]` layout. Returns (o in q's dtype, float32 final state or None).
    `splits`: split each sequence across this many programs (stateless calls only); None chooses.
    `token_order`: the recurrence visits token token_order[s] at step s (a permutation of range(T), int32 or
    int64), read and written in place; None is the tokens' own order."""
    _check_runnable(q, k, v, g)
    _check_splits(splits)
    stateless = initial_state is None and not output_final_state
    if splits is not None and splits > 1 and not stateless:
        raise ValueError("splitting the sequence (splits > 1) needs a call without initial or final state")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    order = None if token_order is None else checked_token_order(token_order, q)
    if stateless:
        return torch.ops.dig.gla_fused_chunk(q, k, v, g, scale, splits or 0, order), None
    if initial_state is not None:
        initial_state = initial_state.float().contiguous()
    return _FusedChunkGLA.apply(*(_rows_in_place(x) for x in (q, k, v, g)), scale, initial_state,
                                output_final_state, order)


def _check_grads_into(grads_into, q: torch.Tensor, v: torch.Tensor) -> None:
    """The dk/dv/dg sweep writes dq and dk at one token stride (GRAD_STRIDE_K), dv at another, each in [B, T, H, D]
    rows (heads and channels packed in a token's row, batches T tokens apart)."""
    dq, dk, dv = grads_into
    shapes_ok = dq.shape == dk.shape == q.shape and dv.shape == v.shape
    dtypes_ok = dq.dtype == dk.dtype == dv.dtype == q.dtype
    rows_ok = all(in_token_rows(x) for x in grads_into)
    if not (shapes_ok and dtypes_ok and rows_ok and token_stride(dq) == token_stride(dk)):
        raise ValueError("grads_into: dq, dk, dv must have q's, k's and v's shapes and q's dtype, each in [B, T, H, D] "
                         "rows with dq and dk at one token stride; got strides "
                         f"{[tuple(x.stride()) for x in grads_into]}, dtypes {[x.dtype for x in grads_into]}")


def _check_splits(splits) -> None:
    if splits is not None and (not isinstance(splits, int) or splits < 1):
        raise ValueError(f"splits must be a positive integer or None, got {splits!r}")


def _check_runnable(q, k, v, g) -> None:
    if not q.dtype == k.dtype == v.dtype:  # the dots' precision is chosen for q's dtype
        raise ValueError(f"backend='triton' needs q, k, v of one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not all(x.is_cuda for x in (q, k, v, g)) and not _INTERPRETED:
        raise ValueError("backend='triton' runs Triton kernels and needs CUDA tensors; got "
                         f"{q.device}. Use backend='torch' (or 'auto') for tensors on {q.device}.")
    if not TRITON_INSTALLED:
        raise RuntimeError("backend='triton' needs Triton (`pip install triton`; it ships with CUDA builds of "
                           "torch). Use backend='torch' for the PyTorch implementation.")
    if not supports(q, v):
        raise ValueError(f"backend='triton' handles head sizes K <= {MAX_K}, V <= {MAX_V}; got K={q.shape[-1]}, "
                         f"V={v.shape[-1]}. Use backend='fla' or 'torch'.")


def checked_token_order(token_order: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """`token_order` as the kernels read it (contiguous int32 on q's device), after checking its shape and type
    (that it is a permutation is the caller's promise: checking it on a GPU would synchronise every call)."""
    T = q.shape[1]
    if token_order.shape != (T,) or token_order.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"token_order must be an int32/int64 permutation of range(T) with T = {T}, got "
                         f"{token_order.dtype} of shape {tuple(token_order.shape)}")
    if token_order.device != q.device:
        raise ValueError(f"token_order is on {token_order.device}, the inputs on {q.device}")
    return token_order.to(torch.int32).contiguous()


def inverse_order(order: torch.Tensor) -> torch.Tensor:
    """inverse[order[s]] = s: for each token, the scan step that visits it."""
    inverse = torch.empty_like(order)
    inverse[order.long()] = torch.arange(order.numel(), device=order.device, dtype=order.dtype)
    return inverse
