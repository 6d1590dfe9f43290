"""Token-mixing ops. `gla` is gated linear attention in fla's `[B, T, H, K]` layout.

backend="triton" runs our fused-chunk Triton kernels (`gla_triton.py`; heads up to K=64, V=128), fastest at
DiG's training shapes; backend="fla" flash-linear-attention's `chunk_gla` (CUDA only); backend="torch" the exact
chunked PyTorch implementation in `gla_torch.py` (any device, float32 compute). backend="auto": on CUDA, triton
when Triton is installed and the heads fit, else fla when installed, else torch; on other devices, torch.
Measured at DiG-XL/2 shapes on an H200 (BENCHMARKS.md "GLA kernels"): triton is 1.5-2.5x faster than fla from 256
to 1024 px, and with 1-2 images at 2048-4096 px, where a stateless call splits each sequence across programs,
2.9-3.1x (forward) and 1.5-1.9x (backward). A call that carries state (initial_state or output_final_state) is
not split: with fewer sequences x heads than SMs it runs one program per pair, several times slower than fla,
so auto gives those calls to fla.
"""
from __future__ import annotations

import warnings

import torch

from .gla_fla import FlaUnavailableError, fla_installed, gla_fla
from .gla_gated import gla_gated_packed_triton
from .gla_torch import gla_torch
from .gla_triton import MAX_K, MAX_V, checked_token_order, gla_triton, inverse_order, triton_installed
from .gla_triton import sm_count_of as _sm_count_of
from .norm_gate_triton import KERNEL_DTYPES as _NORM_GATE_KERNEL_DTYPES
from .norm_gate_triton import rms_norm_swish_gate
from .token_rows import unpack_qkvz

BACKENDS = ("auto", "torch", "fla", "triton")

__all__ = ["BACKENDS", "FlaUnavailableError", "gla", "gla_fla", "gla_gated_packed", "gla_torch", "gla_triton",
           "resolve_backend"]


def resolve_backend(backend: str, device: torch.device, q: torch.Tensor | None = None,
                    v: torch.Tensor | None = None, stateful: bool = False) -> str:
    """The backend `gla` will use for tensors on `device` (and, if given, of q's and v's shapes; `stateful`: the
    call takes an initial state or returns the final one).

    Under torch.compile the sizes may be symbolic (a dynamic batch): the facts about the machine come from
    functions dynamo treats as constants, and the comparison with the sizes is plain Python, which dynamo turns
    into a guard (a batch on the other side of the threshold recompiles instead of failing)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown GLA backend {backend!r}; expected one of {BACKENDS}")
    if backend != "auto":
        return backend
    if device.type != "cuda":
        return "torch"
    triton_ok, fla_ok = _installed()
    if q is not None and (q.shape[-1] > MAX_K or v.shape[-1] > MAX_V):
        triton_ok = False
    # (short-circuited so that a stateless call under torch.compile puts no guard on the batch size)
    unsplit_and_few = stateful and fla_ok and q is not None and q.shape[0] * q.shape[2] < _sm_count_of(device)
    if triton_ok and not unsplit_and_few:
        return "triton"
    if fla_ok:
        return "fla"
    _warn_no_kernels()
    return "torch"


_installed_cache: list[tuple[bool, bool]] = []


@torch._dynamo.assume_constant_result
def _installed() -> tuple[bool, bool]:
    """(Triton, fla) importable; looked up once (eager mode asks on every GLA call)."""
    if not _installed_cache:
        _installed_cache.append((triton_installed(), fla_installed()))
    return _installed_cache[0]


def _warn_no_kernels() -> None:
    global _warned_no_fla
    if not _warned_no_fla:
        _warned_no_fla = True
        warnings.warn("dig.ops.gla: CUDA tensors but neither Triton (for these head sizes) nor flash-linear-attention "
                      "is available; using the (much slower) PyTorch implementation. `pip install triton "
                      "flash-linear-attention` for the Triton kernels.", stacklevel=4)


_warned_no_fla = False


def _check_inputs(q, k, v, g, initial_state):
    if q.dim() != 4:
        raise ValueError(f"q must be [B, T, H, K], got shape {tuple(q.shape)}")
    if k.shape != q.shape or g.shape != q.shape:
        raise ValueError(f"q, k, g must share a shape [B, T, H, K]; got q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"g {tuple(g.shape)}")
    if v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must be [B, T, H, V] with q's B, T, H {tuple(q.shape[:3])}; got {tuple(v.shape)}")
    B, T, H, K = q.shape
    if T == 0:
        raise ValueError("empty sequence (T = 0)")
    if initial_state is not None and initial_state.shape != (B, H, K, v.shape[-1]):
        raise ValueError(f"initial_state must be [B, H, K, V] = {(B, H, K, v.shape[-1])}, "
                         f"got {tuple(initial_state.shape)}")
    tensors = [q, k, v, g] + ([initial_state] if initial_state is not None else [])
    if len({x.device for x in tensors}) != 1:
        raise ValueError(f"GLA inputs are on different devices: {[str(x.device) for x in tensors]}")
    if len({q.dtype, k.dtype, v.dtype}) != 1:
        raise ValueError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")


def gla(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, scale: float | None = None,
        initial_state: torch.Tensor | None = None, output_final_state: bool = False, backend: str = "auto",
        token_order: torch.Tensor | None = None):
    """Gated linear attention, per head: S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t, o_t = (q_t * scale) S_t.

    q, k: [B, T, H, K]; v: [B, T, H, V]; g: [B, T, H, K] log-space forget gates (g <= 0, e.g.
    logsigmoid(x) / 16); initial_state: [B, H, K, V] or None; scale defaults to K ** -0.5.
    token_order: a permutation of range(T) (int32/int64, q's device) or None: step t of the recurrence takes
    token token_order[t], and each output is written at its own token. The Triton kernels read the tokens in
    place; the other backends gather the inputs into that order and scatter the outputs back.
    Returns (o [B, T, H, V] in q's dtype, final state [B, H, K, V] in float32 if output_final_state else None).
    """
    _check_inputs(q, k, v, g, initial_state)
    chosen = resolve_backend(backend, q.device, q, v, stateful=initial_state is not None or output_final_state)
    if chosen == "triton":
        return gla_triton(q, k, v, g, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
                          token_order=token_order)
    if token_order is not None:
        order = checked_token_order(token_order, q).long()
        q, k, v, g = (x.index_select(1, order) for x in (q, k, v, g))
    run = gla_fla if chosen == "fla" else gla_torch
    o, state = run(q, k, v, g, scale=scale, initial_state=initial_state, output_final_state=output_final_state)
    if token_order is not None:
        o = o.index_select(1, inverse_order(order))
    return o, state


def gla_gated_packed(qkvz: torch.Tensor, g: torch.Tensor, weight: torch.Tensor, eps: float,
                     scale: float | None = None, backend: str = "auto",
                     token_order: torch.Tensor | None = None) -> torch.Tensor:
    """rms_norm(o) * weight * silu(gate) per head, o = gla(q, k, v, g) without states, for q | k | v | gate packed
    in one [B, T, 2HK + 2HV] tensor (one GEMM's output; H and K are g's): DiG's GLA layer between its input and
    output projections. Returns y [B, T, H, V] in qkvz's dtype. With the Triton kernels (backend triton, float32 /
    bf16 / fp16) one operator whose gradient is one tensor of qkvz's layout (dig/ops/gla_gated.py); otherwise gla
    and rms_norm_swish_gate on the four views."""
    if g.dim() != 4:
        raise ValueError(f"g must be [B, T, H, K], got shape {tuple(g.shape)}")
    q, k, v, gate = unpack_qkvz(qkvz, g.shape[2], g.shape[3])
    _check_inputs(q, k, v, g, None)
    on_kernels = resolve_backend(backend, qkvz.device, q, v) == "triton" and all(
        x.dtype in _NORM_GATE_KERNEL_DTYPES for x in (qkvz, g, weight))
    if on_kernels:
        return gla_gated_packed_triton(qkvz, g, weight, eps, scale=scale, token_order=token_order)
    o, _ = gla(q, k, v, g, scale=scale, backend=backend, token_order=token_order)
    return rms_norm_swish_gate(o, gate, weight, eps)
