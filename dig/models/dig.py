"""DiG (arXiv 2405.18428): DiT with the attention replaced by gated linear attention (GLA), a depthwise 3x3
convolution after each block, and four-direction scanning (see scan.py). Module names follow the official
release (hustvl/DiG), so its state dicts load (drop their `pos_embed`, which is a fixed buffer here)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from dig.ops import BACKENDS, gla, gla_gated_packed, resolve_backend
from dig.ops.dwconv import depthwise_conv3x3
from dig.ops.norm_gate_torch import rms_norm_swish_gate_torch
from dig.ops.norm_gate_triton import rms_norm_swish_gate
from dig.ops.swiglu_torch import silu_times_up
from dig.ops.swiglu_triton import kernels_apply as swiglu_kernels_apply
from dig.ops.swiglu_triton import swiglu_down
from dig.ops.token_rows import unpack_qkvz

from .base import LatentDiffusionTransformer
from .embedders import modulate
from .scan import (REVERSE_TRANSPOSE, reorient, reorient_after_block, reorientation_after_block, reoriented_grid,
                   restore_raster)


def _gla(q, k, v, g, backend, token_order=None):
    if resolve_backend(backend, q.device, q, v) == "triton":
        # a registered operator: stays inside a compiled block's graph
        return gla(q, k, v, g, backend="triton", token_order=token_order)
    return _gla_outside_graphs(q, k, v, g, backend, token_order)


@torch.compiler.disable
def _gla_outside_graphs(q, k, v, g, backend, token_order):
    """fla's kernels are an autograd Function launching Triton kernels, and the torch reference is a Python loop
    over chunks: both run eagerly between the compiled parts of a block."""
    return gla(q, k, v, g, backend=backend, token_order=token_order)


class RMSNormSwishGate(nn.Module):
    """Per-head RMSNorm of the GLA output (one weight vector shared by all heads) times swish(gate), computed in
    float32, in o's dtype. On CUDA one Triton kernel each way (dig/ops/norm_gate_triton.py): `dig train` DiG-XL/2 at
    256 px / 32 images ran 4 % faster than with inductor's fusion of the torch expression (BENCHMARKS.md).
    kernel=False: the torch expression (inside a compiled block, inductor's fusion of it with its neighbours)."""

    def __init__(self, head_dim: int, eps: float, kernel: bool = True):
        super().__init__()
        self.eps = eps
        self.kernel = kernel
        self.weight = nn.Parameter(torch.ones(head_dim))

    def forward(self, o: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        if self.kernel:
            return rms_norm_swish_gate(o, gate, self.weight, self.eps)
        return rms_norm_swish_gate_torch(o, gate, self.weight, self.eps)


class GatedLinearAttention(nn.Module):
    """fla's GLA layer as DiG uses it: q, k at D*expand_k, v and output gate at D*expand_v, a low-rank
    per-key-channel forget gate logsigmoid(W2 W1 x + b) / 16, no short convolution. The output norm's eps is
    1e-6, not fla's layer default 1e-5: the release builds the layer with its GLAConfig's rms_norm_eps=1e-6.
    packed_projections: q, k, v and the output gate as one GEMM (the weights concatenated per call; parameters and
    names unchanged) whose output goes whole to one operator for the GLA and the output norm-gate
    (dig.ops.gla_gated_packed), whose backward writes one gradient for that GEMM."""

    def __init__(self, hidden_size: int, num_heads: int, expand_k: float = 0.5, expand_v: float = 1.0,
                 gate_low_rank_dim: int = 16, gate_logit_normalizer: float = 16.0, norm_eps: float = 1e-6,
                 backend: str = "auto", norm_gate_kernel: bool = True, packed_projections: bool = True):
        super().__init__()
        self.packed_projections = packed_projections
        key_dim, value_dim = int(hidden_size * expand_k), int(hidden_size * expand_v)
        if key_dim % num_heads or value_dim % num_heads:
            raise ValueError(f"GLA: key dim {key_dim} and value dim {value_dim} must be divisible by "
                             f"num_heads={num_heads}")
        if backend not in BACKENDS:
            raise ValueError(f"unknown gla_backend {backend!r}; expected one of {BACKENDS}")
        self.num_heads = num_heads
        self.gate_logit_normalizer = gate_logit_normalizer
        self.backend = backend
        self.q_proj = nn.Linear(hidden_size, key_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, key_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, value_dim, bias=False)
        self.g_proj = nn.Linear(hidden_size, value_dim, bias=False)
        self.gk_proj = nn.Sequential(nn.Linear(hidden_size, gate_low_rank_dim, bias=False),
                                     nn.Linear(gate_low_rank_dim, key_dim, bias=True))
        self.o_proj = nn.Linear(value_dim, hidden_size, bias=False)
        self.g_norm_swish_gate = RMSNormSwishGate(value_dim // num_heads, norm_eps, kernel=norm_gate_kernel)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight, gain=2 ** -2.5)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.ones_(self.g_norm_swish_gate.weight)

    def forward(self, x: torch.Tensor, token_order: torch.Tensor | None = None) -> torch.Tensor:
        """token_order: the order the recurrence visits the tokens in (see dig.ops.gla); None: as they come."""
        n, t, _ = x.shape
        if x.device.type in ("cuda", "cpu") and torch.is_autocast_enabled(x.device.type):
            # Cast once: autocast would cast x separately for each projection below, and each linear would save
            # its own copy of it for backward.
            x = x.to(torch.get_autocast_dtype(x.device.type))
        heads = lambda z: z.reshape(n, t, self.num_heads, -1)  # noqa: E731  [N, T, H, head_dim], fla's layout
        gk = F.logsigmoid(heads(self.gk_proj(x))) / self.gate_logit_normalizer
        if self.packed_projections:
            qkvz = _stacked_linears(x, (self.q_proj, self.k_proj, self.v_proj, self.g_proj))
            q, k, v, gate = unpack_qkvz(qkvz, self.num_heads, gk.shape[-1])
            if self.g_norm_swish_gate.kernel and resolve_backend(self.backend, x.device, q, v) == "triton":
                # one operator for the GLA and the norm-gate: its gradient is one tensor of qkvz's layout
                norm = self.g_norm_swish_gate
                o = gla_gated_packed(qkvz, gk, norm.weight, norm.eps, backend="triton", token_order=token_order)
                return self.o_proj(o.reshape(n, t, -1))
        else:
            q, k, v, gate = self.q_proj(x), self.k_proj(x), self.v_proj(x), self.g_proj(x)
            q, k, v, gate = heads(q), heads(k), heads(v), heads(gate)
        o, _ = _gla(q, k, v, gk, self.backend, token_order)
        o = self.g_norm_swish_gate(o, gate)
        return self.o_proj(o.reshape(n, t, -1))


def _stacked_linears(x: torch.Tensor, linears: tuple[nn.Linear, ...]) -> torch.Tensor:
    """Bias-free linears of x as one GEMM, their outputs side by side; the weights are concatenated per call, so
    the parameters and their names stay the release's."""
    # (x is already in autocast's dtype: casting each weight before the concatenation halves its bytes)
    return F.linear(x, torch.cat([m.weight.to(x.dtype) for m in linears]))


class SwiGLU(nn.Module):
    """silu(gate) * up -> down, hidden width 256 * ceil(int(D * mlp_ratio * 2/3) / 256).
    recompute_product: autograd keeps only the gate/up projection (which the SwiGLU's own backward needs) and
    recomputes silu(gate) * up in the backward for down_proj's weight gradient, instead of saving it too
    (DiG-XL/2: 6 KB less per token and block, 13 % of a compiled block's activations). With `kernel` (and CUDA,
    Triton) that is one operator (dig/ops/swiglu_triton.py) whose backward kernel writes the product beside
    d(gate/up) from one read of gate/up; otherwise activation checkpointing of the product."""

    def __init__(self, hidden_size: int, mlp_ratio: float = 4.0, recompute_product: bool = False,
                 kernel: bool = True):
        super().__init__()
        inner = int(hidden_size * mlp_ratio * 2 / 3)
        self.intermediate_size = 256 * ((inner + 255) // 256)
        self.gate_proj = nn.Linear(hidden_size, 2 * self.intermediate_size, bias=False)
        self.down_proj = nn.Linear(self.intermediate_size, hidden_size, bias=False)
        self.recompute_product = recompute_product
        self.kernel = kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_proj(x)
        if self.recompute_product and self.kernel and swiglu_kernels_apply(gate_up):
            # (autocast would cast down_proj's weight for F.linear: the operator takes it in gate_up's dtype)
            return swiglu_down(gate_up, self.down_proj.weight.to(gate_up.dtype))
        if self.recompute_product:
            product = checkpoint(silu_times_up, gate_up, use_reentrant=False)
        else:
            product = silu_times_up(gate_up)
        return self.down_proj(product)


class DiGBlock(nn.Module):
    """[long-skip fuse] -> adaLN-Zero GLA -> adaLN-Zero SwiGLU -> depthwise 3x3 conv over the token grid
    (dw_conv_flipped_grad: its input gradient as a forward convolution, dig/ops/dwconv.py; False: F.conv2d's;
    packed_projections: GatedLinearAttention's; mlp_recompute, mlp_kernel: SwiGLU's recompute_product, kernel)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, gla_backend: str, long_skip: bool,
                 norm_gate_kernel: bool = True, mlp_recompute: bool = False, dw_conv_flipped_grad: bool = True,
                 packed_projections: bool = True, mlp_kernel: bool = True):
        super().__init__()
        self.dw_conv_flipped_grad = dw_conv_flipped_grad
        self.skip_linear = nn.Linear(2 * hidden_size, hidden_size) if long_skip else None
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = GatedLinearAttention(hidden_size, num_heads, backend=gla_backend,
                                         norm_gate_kernel=norm_gate_kernel, packed_projections=packed_projections)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = SwiGLU(hidden_size, mlp_ratio, recompute_product=mlp_recompute, kernel=mlp_kernel)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))
        self.dw_conv = nn.Conv2d(hidden_size, hidden_size, kernel_size=3, padding=1, groups=hidden_size)

    def reset_dw_conv(self) -> None:
        """Identity: a randomly initialised DWConv costs FID (the paper's ablation)."""
        with torch.no_grad():
            self.dw_conv.weight.zero_()
            self.dw_conv.weight[:, :, 1, 1] = 1.0
            self.dw_conv.bias.zero_()

    def forward(self, x: torch.Tensor, c: torch.Tensor, grid: tuple[int, int],
                skip: torch.Tensor | None = None, token_order: torch.Tensor | None = None,
                conv_taps: torch.Tensor | None = None, reorient_input: str | None = None,
                transposed: bool = False) -> torch.Tensor:
        """x: (N, T, D) tokens filling `grid` (rows, cols) row by row, or its transpose (cols, rows) if `transposed`
        (the grid as booleans and a fixed pair: a compiled block specialises on them, whereas int arguments that
        change between calls become dynamic sizes).
        reorient_input (scan.REVERSE or REVERSE_TRANSPOSE): x comes in the previous block's orientation and this
        block first reorients it; `grid`/`transposed` describe the reoriented tokens. Inside a compiled block the
        reorientation is index arithmetic in the kernels that read x, not a copy between blocks.
        token_order and conv_taps (DiG.scan_in_kernel): x stays in raster order; the GLA visits the tokens in
        this block's scan direction, and the 3x3 taps are rearranged (flipped, transposed) to match, so that the
        result is the raster-order view of what the block computes on the reoriented sequence."""
        # (`grid` itself is never reassigned: a graph break inside the block, e.g. fla's GLA, makes the locals
        # the inputs of the graph after it, and an int local that differs between blocks would become dynamic)
        if reorient_input is not None:
            before = _transposed_if(grid, transposed != (reorient_input == REVERSE_TRANSPOSE))
            x, _ = reorient(x, before, reorient_input)
        if self.skip_linear is not None:
            if skip is None:
                raise ValueError("this block has a long skip; pass the matching first-half output")
            x = self.skip_linear(torch.cat([x, skip], dim=-1))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), token_order)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        n, t, d = x.shape
        # (N, T, D) tokens are an NHWC image: convolve it channels-last and read the result back as tokens,
        # both without a copy.
        weight = self.dw_conv.weight
        if conv_taps is not None:
            weight = weight.flatten(2)[:, :, conv_taps].view_as(weight)
        x = depthwise_conv3x3(x.reshape(n, *_transposed_if(grid, transposed), d), weight, self.dw_conv.bias,
                              flipped_input_grad=self.dw_conv_flipped_grad)
        return x.reshape(n, t, d)


def _transposed_if(grid: tuple[int, int], transpose: bool) -> tuple[int, int]:
    return (grid[1], grid[0]) if transpose else grid


def scan_directions(grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """For the four block inputs of the reorientation cycle (block i uses entry i % 4): the raster index of the
    token at each step of that block's sequence ([4, T] int32), and where each of the 3x3 depthwise-conv taps
    comes from when the conv runs on the raster grid instead of the reoriented one ([4, 9]). Block i's grid is
    the raster grid flipped in both axes (i odd) and transposed (i // 2 odd); a 3x3 conv (padding 1) of a
    flipped / transposed grid is the flip / transpose of the conv of the grid by the flipped / transposed kernel."""
    rows, cols = grid
    index, current = torch.arange(rows * cols).view(1, -1, 1), grid
    orders = []
    for i in range(4):
        orders.append(index.flatten().to(torch.int32))
        index, current = reorient_after_block(index, current, i)
    taps = []
    for i in range(4):
        tap = torch.arange(9).view(3, 3)
        if i % 2:
            tap = tap.flip(0, 1)
        if (i // 2) % 2:
            tap = tap.t()
        taps.append(tap.flatten())
    return torch.stack(orders), torch.stack(taps)


class DiG(LatentDiffusionTransformer):
    """Diffusion GLA transformer. With long_skip=True this is U-DiG: as in the release, the outputs of blocks
    0 .. depth/2 - 2 (after their reorientation) are fused, last in first out, into blocks depth/2 + 1 ..
    depth - 1 by Linear(2D, D); block depth/2 has none. skip_init "zero" initialises those Linears as [I | 0]
    (the release's "skipzero"), "xavier" like every other Linear (its "skip"). Kept from the release: a skip
    is fused in the scan order it was stored in, which for odd block indices is the transpose of the current
    order: spatially misaligned, as in the release (for non-square grids the two grids even differ in shape).
    scan_in_kernel (DiG without long skips): the sequence stays in raster order and each block's GLA reads its
    scan direction through a token order (no reorienting copy between blocks; the Triton kernels read the order
    in place). norm_gate_kernel=False: the GLA output norm and gate as the torch expression instead of the Triton
    kernels (model.overrides.norm_gate_kernel=false; for measuring one against the other).
    dw_conv_flipped_grad (default): the depthwise conv's input gradient as cuDNN's forward convolution of the output
    gradient with the taps flipped (dig/ops/dwconv.py), half the time of cuDNN's input-gradient kernel; false:
    F.conv2d's backward. packed_projections (default): each GLA layer's q, k, v and output-gate projections as one
    GEMM (DiT's qkv shape), its output read in place and its gradient written as one tensor by one operator for the
    GLA and its output norm-gate (dig/ops/gla_gated.py): DiG-XL/2 steps about 3 % shorter on an H200 at 256 px / 32,
    512 px / 32 and 1024 px / 8 (BENCHMARKS.md, 2026-11-30); false: four GEMMs. mlp_recompute (default): each
    SwiGLU recomputes silu(gate) * up in the backward instead of saving it (SwiGLU.recompute_product): peak memory
    at 512 px / 32 images on one H200 47.6 GiB instead of 52.8 (DiT-XL/2: 47.8) for 0-1 % of the speed. mlp_kernel
    (default; with mlp_recompute, on CUDA): that recompute inside one operator whose backward kernel writes the
    product beside d(gate/up) from one read of gate/up (dig/ops/swiglu_triton.py); false: activation checkpointing
    of the product, a kernel of its own in the backward."""

    def __init__(self, *, depth: int, hidden_size: int, num_heads: int, patch_size: int, mlp_ratio: float = 4.0,
                 input_size: int | tuple[int, int] = 32, in_channels: int = 4, num_classes: int = 1000,
                 learn_sigma: bool = True, class_dropout_prob: float = 0.1, gla_backend: str = "auto",
                 grad_checkpointing: bool = False, pos_embed_base_size: int | tuple[int, int] | None = None,
                 long_skip: bool = False, skip_init: str = "zero", scan_in_kernel: bool = False,
                 norm_gate_kernel: bool = True, mlp_recompute: bool = True, dw_conv_flipped_grad: bool = True,
                 packed_projections: bool = True, mlp_kernel: bool = True):
        super().__init__(input_size=input_size, patch_size=patch_size, in_channels=in_channels,
                         hidden_size=hidden_size, num_classes=num_classes, learn_sigma=learn_sigma,
                         class_dropout_prob=class_dropout_prob, pos_embed_base_size=pos_embed_base_size,
                         grad_checkpointing=grad_checkpointing)
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        if long_skip and depth % 2:
            raise ValueError(f"U-DiG pairs first-half and second-half blocks: depth must be even, got {depth}")
        if skip_init not in ("zero", "xavier"):
            raise ValueError(f"skip_init must be 'zero' or 'xavier', got {skip_init!r}")
        if scan_in_kernel and long_skip:
            raise ValueError("scan_in_kernel keeps the sequence in raster order, but U-DiG's long skips are fused "
                             "in the reoriented order (as the release does); use scan_in_kernel=False for U-DiG")
        self.depth = depth
        self.num_heads = num_heads
        self.long_skip = long_skip
        self.skip_init = skip_init
        self.blocks = nn.ModuleList([
            DiGBlock(hidden_size, num_heads, mlp_ratio, gla_backend, long_skip=long_skip and i > depth // 2,
                     norm_gate_kernel=norm_gate_kernel, mlp_recompute=mlp_recompute,
                     dw_conv_flipped_grad=dw_conv_flipped_grad, packed_projections=packed_projections,
                     mlp_kernel=mlp_kernel)
            for i in range(depth)
        ])
        self.scan_in_kernel = scan_in_kernel
        if scan_in_kernel:
            orders, taps = scan_directions(self.grid_size)
            self.register_buffer("scan_token_orders", orders, persistent=False)
            self.register_buffer("scan_conv_taps", taps, persistent=False)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        self.init_shared_weights()
        for block in self.blocks:
            block.attn.reset_parameters()  # xavier with gain 2^-2.5, as fla initialises its GLA layer
            block.reset_dw_conv()
            if block.skip_linear is not None and self.skip_init == "zero":
                with torch.no_grad():
                    d = self.hidden_size
                    block.skip_linear.weight.zero_()
                    block.skip_linear.weight[:, :d].copy_(torch.eye(d))
                    block.skip_linear.bias.zero_()

    @property
    def block_input_kinds(self) -> int:
        if self.scan_in_kernel:  # the four token orders are tensors: one graph
            return 1
        # U-DiG: with and without a long skip; DiG: input as it comes (block 0), reversed, reversed + transposed;
        # on a non-square grid, each also on the transposed grid (except block 0's)
        square = self.grid_size[0] == self.grid_size[1]
        if self.long_skip:
            return 2 if square else 4
        return 3 if square else 5

    def forward_blocks(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        grid = self.grid_size
        if self.scan_in_kernel:  # the same computation without reorienting copies between the blocks
            for i, block in enumerate(self.blocks):
                x = self.run_block(block, x, c, grid, None, self.scan_token_orders[i % 4],
                                   self.scan_conv_taps[i % 4])
            return x
        skips: list[torch.Tensor] = []
        pending = None  # the reorientation after the previous block, which the next block applies to its input
        for i, block in enumerate(self.blocks):
            skip = skips.pop() if block.skip_linear is not None else None
            if pending is not None:
                grid = reoriented_grid(grid, pending)
            x = self.run_block(block, x, c, self.grid_size, skip, None, None, pending, grid != self.grid_size)
            pending = reorientation_after_block(i)
            if self.long_skip:  # U-DiG's long skips keep the reoriented sequence: reorient here, between blocks
                x, grid = reorient(x, grid, pending)
                pending = None
                if i < self.depth // 2 - 1:
                    skips.append(x)
        if pending is not None:
            x, grid = reorient(x, grid, pending)
        x, grid = restore_raster(x, grid, self.depth)
        assert grid == self.grid_size and not skips
        return x
