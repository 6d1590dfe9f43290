"""GroupNorm (+ SiLU) over channels-last activations in Triton, for the VAE encoder of the latent pipeline.

Why. The compiled encoder (channels-last, bf16) spends about a third of its GPU time in inductor's GroupNorm
kernels (profile: `bench/bench_pipeline.py --only encoder --profile`, BENCHMARKS.md). Each of a group's
statistics is a reduction over H x W x C/G values that lie C/G channels apart in every pixel's row of C, so
inductor's reduction reads a few bytes out of every row of C: far below the copy rate. Here every program reads
whole pixel rows (all C channels, contiguous) and reduces them to all G groups at once.

What. x: [N, C, *spatial] whose memory is [N, *spatial, C] (channels-last, e.g. a conv's output in a
channels-last network; diffusers' attention hands its GroupNorm the same layout as [N, C, L]); weight, bias:
[C]. y = (x - mean_g) / sqrt(var_g + eps) * weight + bias per sample and group of C/G channels (biased
variance, as torch), then y * sigmoid(y) when `silu`. Float32 math; y in x's dtype and layout. Inference only:
the operator has no backward (the dispatcher takes the torch reference whenever autograd would need one).

How. Two kernels and a few tiny torch ops: (1) statistics: the L = prod(spatial) pixel rows of each sample are
cut into splits; a program walks its split in tiles of BLOCK_L rows x C channels, every register keeping a
running mean and sum of squared deviations (Welford: no E[x^2] - E[x]^2 cancellation, and no reduction across
threads inside the loop), then merges its rows and each group's channels (Chan et al.'s pairwise update); (2) the splits' (count, mean, M2) merge the same way in torch to the
groups' mean and 1/std; (3) normalise: one program per tile, reading x once and writing y once.

The reference is `group_norm_torch.py`; tests run these kernels through Triton's interpreter on the CPU
(TRITON_INTERPRET=1, read at import) and on GPUs.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os

import torch

from .group_norm_torch import group_norm_silu_torch

# A tile is TILE values: BLOCK_L = TILE / C pixel rows (C = 128 ... 512 in the SD VAE: 32 ... 8 rows), 16 fp32
# values per thread with 8 warps. Statistics run in about STATS_PROGRAMS programs (a few per SM on an H200) whatever
# the batch, each looping over its split's tiles. 8 warps against 4: 4.3 against 5.3 ms over four of the SD
# encoder's six norm shapes at 128 rows, 1.26-4.4x the byte floor (`python3 -m bench.bench_group_norm`, BENCHMARKS.md).
TILE = 4096
NUM_WARPS = 8
STATS_PROGRAMS = 1024
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Module constants, not calls, so that torch.compile traces group_norm_silu without a graph break.
TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # Triton's CPU interpreter (tests)


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def channels_last_rows(x: torch.Tensor) -> bool:
    """Whether x [N, C, *spatial] is stored as [N, *spatial, C] rows, densely."""
    return x.dim() >= 3 and x.movedim(1, -1).is_contiguous()


def kernels_apply(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None) -> bool:
    """Whether the kernels take this call: CUDA (or the interpreter), Triton installed, float32/bf16/fp16,
    channels-last rows, C a power of two (so is every G dividing it), an affine norm with [C] weight and bias on
    x's device, and no gradient to take."""
    C = x.shape[1] if x.dim() >= 2 else 0
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
    affine = all(t is not None and t.shape == (C,) and t.device == x.device for t in (weight, bias))
    return (TRITON_INSTALLED and (x.is_cuda or _INTERPRETED) and x.dtype in KERNEL_DTYPES and not needs_grad
            and affine and channels_last_rows(x) and _power_of_two(C) and C % num_groups == 0 and x.numel() > 0)


if TRITON_INSTALLED:
    import triton
    import triton.language as tl

    @triton.jit
    def _group_sums(per_channel, G: tl.constexpr, CPG: tl.constexpr):
        """[C] per-channel values -> [G] sums over each group's CPG channels."""
        return tl.sum(tl.reshape(per_channel, (G, CPG)), axis=1)

    @triton.jit
    def _per_channel(per_group, G: tl.constexpr, CPG: tl.constexpr):
        """[G] per-group values -> [C], each channel its group's value."""
        return tl.reshape(tl.broadcast_to(per_group[:, None], (G, CPG)), (G * CPG,))

    @triton.jit
    def _stats_kernel(x_ptr, mean_ptr, m2_ptr, L, SPLITS, TILES_PER_SPLIT, C: tl.constexpr, G: tl.constexpr,
                      BLOCK_L: tl.constexpr):
        # Every register of the [BLOCK_L, C] tile keeps its own running (mean, M2) over the split's tiles
        # (Welford), so the loop has no reduction across threads; rows, then the channels of a group, are merged
        # once at the end (Chan et al.).
        n = tl.program_id(0).to(tl.int64)
        split = tl.program_id(1)
        cols = tl.arange(0, C)
        count = tl.zeros([BLOCK_L], tl.float32)
        mean = tl.zeros([BLOCK_L, C], tl.float32)
        m2 = tl.zeros([BLOCK_L, C], tl.float32)
        first = split * TILES_PER_SPLIT * BLOCK_L
        for t in range(TILES_PER_SPLIT):
            rows = first + t * BLOCK_L + tl.arange(0, BLOCK_L)
            valid = rows < L
            x = tl.load(x_ptr + (n * L + rows[:, None]) * C + cols[None, :], mask=valid[:, None],
                        other=0.).to(tl.float32)
            count += valid.to(tl.float32)
            share = tl.where(valid, 1. / tl.maximum(count, 1.), 0.)
            delta = x - mean
            mean += delta * share[:, None]
            m2 += tl.where(valid[:, None], delta * (x - mean), 0.)
        rows_total = tl.sum(count, axis=0)
        channel_mean = tl.sum(mean * count[:, None], axis=0) / rows_total
        spread = mean - channel_mean[None, :]
        channel_m2 = tl.sum(m2 + spread * spread * count[:, None], axis=0)
        CPG: tl.constexpr = C // G
        group_mean = _group_sums(channel_mean, G, CPG) / CPG
        spread_g = channel_mean - _per_channel(group_mean, G, CPG)
        group_m2 = _group_sums(channel_m2 + spread_g * spread_g * rows_total, G, CPG)
        groups = tl.arange(0, G)
        tl.store(mean_ptr + (n * SPLITS + split) * G + groups, group_mean)
        tl.store(m2_ptr + (n * SPLITS + split) * G + groups, group_m2)

    @triton.jit
    def _normalize_kernel(x_ptr, y_ptr, mean_ptr, rstd_ptr, weight_ptr, bias_ptr, L, TILES, C: tl.constexpr,
                          G: tl.constexpr, BLOCK_L: tl.constexpr, SILU: tl.constexpr):
        n = (tl.program_id(0) // TILES).to(tl.int64)
        rows = (tl.program_id(0) % TILES) * BLOCK_L + tl.arange(0, BLOCK_L)
        valid = rows[:, None] < L
        cols = tl.arange(0, C)
        offsets = (n * L + rows[:, None]) * C + cols[None, :]
        x = tl.load(x_ptr + offsets, mask=valid, other=0.).to(tl.float32)
        group = cols // (C // G)
        mean = tl.load(mean_ptr + n * G + group)
        scale = tl.load(rstd_ptr + n * G + group) * tl.load(weight_ptr + cols).to(tl.float32)
        y = (x - mean[None, :]) * scale[None, :] + tl.load(bias_ptr + cols).to(tl.float32)[None, :]
        if SILU:
            y = y / (1. + tl.exp(-y))
        tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=valid)


def _layout(N: int, L: int, C: int) -> tuple[int, int, int, int]:
    """(BLOCK_L, tiles per sample, splits per sample, tiles per split)."""
    block_l = max(1, TILE // C)
    tiles = -(-L // block_l)
    wanted = max(1, -(-STATS_PROGRAMS // N))
    per_split = -(-tiles // min(tiles, wanted))
    return block_l, tiles, -(-tiles // per_split), per_split


def _group_norm_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, num_groups: int, eps: float,
                     silu: bool) -> torch.Tensor:
    if x.numel() == 0:
        return torch.empty_like(x)
    if not channels_last_rows(x):
        # The dispatcher checked the layout; a compiler that hands the op another one gets a channels-last copy
        # computed, and the result in x's own layout (the one the fake implementation promised).
        y = _group_norm_silu(x.movedim(1, -1).contiguous().movedim(-1, 1), weight, bias, num_groups, eps, silu)
        return torch.empty_like(x).copy_(y)
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():  # Triton launches on the current device
        return _launch(x, weight, bias, num_groups, eps, silu)


def _launch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, num_groups: int, eps: float,
            silu: bool) -> torch.Tensor:
    N, C = x.shape[:2]
    L = x[0, 0].numel()
    block_l, tiles, splits, per_split = _layout(N, L, C)
    weight, bias = weight.contiguous(), bias.contiguous()
    means = torch.empty(N, splits, num_groups, dtype=torch.float32, device=x.device)
    m2s = torch.empty_like(means)
    _stats_kernel[(N, splits)](x, means, m2s, L, splits, per_split, C=C, G=num_groups, BLOCK_L=block_l,
                               num_warps=NUM_WARPS)
    # merge the splits: every split's values per group, the last split may be shorter
    counts = (torch.arange(splits, device=x.device) * (per_split * block_l)).neg_().add_(L)
    counts = counts.clamp_(max=per_split * block_l).float().mul_(C // num_groups)[None, :, None]
    total = float(L * (C // num_groups))
    mean = (means * counts).sum(1) / total
    var = (m2s.sum(1) + (counts * (means - mean[:, None]).square()).sum(1)) / total
    rstd = torch.rsqrt(var + eps)
    y = torch.empty_like(x)
    _normalize_kernel[(N * tiles,)](x, y, mean, rstd, weight, bias, L, tiles, C=C, G=num_groups, BLOCK_L=block_l,
                                    SILU=silu, num_warps=NUM_WARPS)
    return y


@torch.library.custom_op("dig::group_norm_silu", mutates_args=())
def group_norm_silu_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, num_groups: int, eps: float,
                       silu: bool) -> torch.Tensor:
    return _group_norm_silu(x, weight, bias, num_groups, eps, silu)


@group_norm_silu_op.register_fake
def _(x, weight, bias, num_groups, eps, silu):
    return torch.empty_like(x)


def kernels_launch(device: torch.device) -> str | None:
    """None when the kernels run on `device` and agree with the reference on a small input; otherwise why not
    (Triton missing, or unable to build its launcher: it needs a C compiler and the CUDA driver library)."""
    if not TRITON_INSTALLED:
        return "Triton is not installed"
    try:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(2, 32, 3, 3, generator=gen).to(device).contiguous(memory_format=torch.channels_last)
        weight, bias = torch.ones(32, device=device), torch.zeros(32, device=device)
        with torch.no_grad():
            got = torch.ops.dig.group_norm_silu(x, weight, bias, 8, 1e-5, True)
        if not torch.allclose(got, group_norm_silu_torch(x, 8, weight, bias, 1e-5, True), rtol=1e-4, atol=1e-4):
            return "their output differs from torch's GroupNorm"
    except Exception as exc:  # noqa: BLE001 - reported to the caller, who falls back to torch
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return None


def group_norm_silu(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
                    eps: float, silu: bool) -> torch.Tensor:
    """GroupNorm of x [N, C, *spatial] (then SiLU when `silu`), in x's dtype: the Triton kernels where
    `kernels_apply`, else the torch reference (same math)."""
    if x.dim() < 2 or x.shape[1] % num_groups:
        raise ValueError(f"group_norm_silu: x must be [N, C, ...] with C divisible by num_groups={num_groups}; "
                         f"got {tuple(x.shape)}")
    if kernels_apply(x, num_groups, weight, bias):
        return torch.ops.dig.group_norm_silu(x, weight, bias, num_groups, eps, silu)
    return group_norm_silu_torch(x, num_groups, weight, bias, eps, silu)
