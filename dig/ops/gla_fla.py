"""Adapter to flash-linear-attention's Triton `chunk_gla` (CUDA only), imported lazily.

fla's signature moved over releases: until 2025 `chunk_gla` took `head_first` (default True in early releases),
later releases deprecated and then dropped it and always use the time-major `[B, T, H, K]` layout; 2026 releases
added `state_v_first` (a `[V, K]` state). We pass whichever of these the installed version has so that the
layout is always `[B, T, H, K]` with `[B, H, K, V]` states. Releases before 0.3 are refused: some of them only
knew the head-first layout.
"""
from __future__ import annotations

import functools
import importlib.util
import inspect
import re

import torch

MIN_FLA_VERSION = (0, 3)


class FlaUnavailableError(RuntimeError):
    """flash-linear-attention is not installed (or too old) for backend='fla'."""


def fla_installed() -> bool:
    return importlib.util.find_spec("fla") is not None


@functools.lru_cache(maxsize=None)
def load_chunk_gla():
    """fla.ops.gla.chunk_gla plus the keyword arguments that pin the layout for this fla version."""
    if not fla_installed():
        raise FlaUnavailableError(
            "backend='fla' needs flash-linear-attention (`pip install flash-linear-attention`, or the `gpu` extra "
            "of this package); it is not installed. Use backend='torch' for the PyTorch implementation.")
    try:  # imports Triton (and, in full flash-linear-attention releases, transformers): only when asked for
        import fla
        from fla.ops.gla import chunk_gla
    except ImportError as e:
        raise FlaUnavailableError(f"flash-linear-attention is installed but does not import: {e}") from e

    version = getattr(fla, "__version__", None)
    if version is not None:
        parsed = tuple(int(x) for x in re.findall(r"\d+", version)[:2])
        if parsed < MIN_FLA_VERSION:
            raise FlaUnavailableError(f"flash-linear-attention {version} is too old; dig.ops needs >= "
                                      f"{'.'.join(map(str, MIN_FLA_VERSION))} (time-major chunk_gla).")
    params = inspect.signature(chunk_gla).parameters
    layout_kwargs = {}
    if "head_first" in params:
        layout_kwargs["head_first"] = False
    if "state_v_first" in params:
        layout_kwargs["state_v_first"] = False
    return chunk_gla, layout_kwargs


def gla_fla(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, scale: float | None = None,
            initial_state: torch.Tensor | None = None, output_final_state: bool = False):
    """fla's chunk_gla on CUDA tensors in `[B, T, H, K]` layout. Returns (o in q's dtype, float32 state or None)."""
    if not all(x.is_cuda for x in (q, k, v, g)):
        raise ValueError("backend='fla' runs Triton kernels and needs CUDA tensors; got "
                         f"{q.device}. Use backend='torch' (or 'auto') for tensors on {q.device}.")
    chunk_gla, layout_kwargs = load_chunk_gla()
    if initial_state is not None:
        initial_state = initial_state.float().contiguous()  # fla keeps (and asserts) float32 states
    o, final_state = chunk_gla(q.contiguous(), k.contiguous(), v.contiguous(), g.contiguous(), scale=scale,
                               initial_state=initial_state, output_final_state=output_final_state, **layout_kwargs)
    return o.to(q.dtype), (final_state.float() if output_final_state else None)
