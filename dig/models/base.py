"""What DiG and DiT have in common: embed latents + time + class, run the blocks, final adaLN layer,
unpatchify, classifier-free guidance. Subclasses build `self.blocks` and implement `forward_blocks`."""
from __future__ import annotations

import os

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from .embedders import FinalLayer, LabelEmbedder, PatchEmbed, TimestepEmbedder, pair, sincos_pos_embed_2d


class LatentDiffusionTransformer(nn.Module):
    """Predicts noise (and, with learn_sigma, the variance interpolation) for latents of shape
    (N, in_channels, *latent_hw). `input_size` is kept as given (int or (h, w)); `latent_hw` is always (h, w)."""

    blocks: nn.ModuleList

    def __init__(self, *, input_size: int | tuple[int, int], patch_size: int, in_channels: int, hidden_size: int,
                 num_classes: int, learn_sigma: bool, class_dropout_prob: float,
                 pos_embed_base_size: int | tuple[int, int] | None, grad_checkpointing: bool):
        super().__init__()
        self.input_size = input_size
        self.latent_hw = pair(input_size, "input_size")
        if any(s % patch_size for s in self.latent_hw):
            raise ValueError(f"input_size {self.latent_hw} is not divisible by patch_size {patch_size}")
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0 (0 = unconditional), got {num_classes}")
        self.grid_size = (self.latent_hw[0] // patch_size, self.latent_hw[1] // patch_size)
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.learn_sigma = learn_sigma
        self.hidden_size = hidden_size
        self.num_classes = num_classes
        self.grad_checkpointing = grad_checkpointing

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob) if num_classes > 0 else None
        base_grid = None
        if pos_embed_base_size is not None:
            base_grid = pair(pos_embed_base_size, "pos_embed_base_size")
        # Fixed, and non-persistent so that state dicts do not depend on the resolution.
        self.register_buffer("pos_embed", sincos_pos_embed_2d(hidden_size, self.grid_size, base_grid)
                             .to(torch.get_default_dtype()).unsqueeze(0), persistent=False)
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)

    def init_shared_weights(self) -> None:
        """DiT's initialisation of everything outside the blocks' token mixers (call after building blocks)."""
        def xavier_linears(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        self.apply(xavier_linears)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # like nn.Linear, not nn.Conv2d
        nn.init.zeros_(self.x_embedder.proj.bias)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:  # adaLN-Zero: every residual branch starts gated off
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def compile_blocks(self, mode: str | None = None, **compile_kwargs) -> None:
        """Regional compilation: torch.compile each block's forward in place (the blocks share one compiled graph),
        which fuses the elementwise work around the matmuls (adaLN modulate, norms, gates) and cuts saved
        activations. Only `forward` is compiled, not the module call: hooks on the block (ZeRO-3 gathers a
        block's weights in a forward pre-hook) stay eager around the compiled graph. `mode`: torch.compile's.

        Inductor's layout optimization is off for the blocks (unless TORCHINDUCTOR_LAYOUT_OPTIMIZATION is set):
        with a convolution in the graph (DiG's depthwise conv) it treats every 4-D tensor upstream of the conv as an
        image and stores it channels-last, so the heads-split [N, T, H, head_dim] tensors around the GLA get the
        token index innermost, and inductor copies them to and from the row-major layout the custom ops take
        (forward and backward, q, k, v, the gate logits, the output and its gate). The conv's input is a
        channels-last view of the tokens already."""
        # Every block runs the same code, so dynamo keeps one cache of graphs for all of them, one graph per input
        # kind (shapes, grad mode, per-block arguments); past its recompile limit a block silently runs eagerly.
        # Leave room for the default 8 per kind of block input.
        config = torch._dynamo.config
        config.recompile_limit = max(config.recompile_limit, 8 * self.block_input_kinds)
        options = _inductor_options(mode, compile_kwargs)
        for block in self.blocks:
            block.forward = torch.compile(block.forward, options=options, **compile_kwargs)

    def compile_block_stack(self, mode: str | None = None, **compile_kwargs) -> None:
        """torch.compile `forward_blocks` as one region: the whole stack of blocks in one graph each way (with mode
        reduce-overhead one CUDA graph for all blocks instead of one per block, so no host work between blocks).
        Nothing may hook a block (ZeRO-3 does: use compile_blocks there), and inductor compiles every block
        (minutes at XL depth). The trainer's model.compile_scope=stack; bench.bench_trainer_overhead
        --bare-compile-scope stack times it against compile_blocks."""
        if self.grad_checkpointing:
            raise ValueError("compile_block_stack with grad_checkpointing: dynamo does not compile checkpointed blocks "
                             "inside one region (they would run eagerly); use compile_blocks")
        self.forward_blocks = torch.compile(self.forward_blocks, options=_inductor_options(mode, compile_kwargs),
                                            **compile_kwargs)

    @property
    def block_input_kinds(self) -> int:
        """How many kinds of argument the blocks take apart from shapes (each compiles to its own graph)."""
        return 1

    def run_block(self, block: nn.Module, *args):
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def forward_blocks(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """(N, T, D) raster-order tokens -> (N, T, D) raster-order tokens."""
        raise NotImplementedError

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, p*p*C) raster-order tokens -> (N, C, H, W)."""
        (gh, gw), p, c = self.grid_size, self.patch_size, self.out_channels
        x = x.reshape(x.shape[0], gh, gw, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, gh * p, gw * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """x: (N, C, H, W) latents, t: (N,) timesteps, y: (N,) class labels (index num_classes = null class)."""
        if x.ndim != 4 or tuple(x.shape[1:]) != (self.in_channels, *self.latent_hw):
            raise ValueError(f"expected latents of shape (N, {self.in_channels}, {self.latent_hw[0]}, "
                             f"{self.latent_hw[1]}), got {tuple(x.shape)}")
        # Contiguous (the patch conv's output is a transposed view, and the sum keeps its layout): compiled blocks
        # (inductor, torch 2.13 on CPU) return wrong input gradients for a block input in that layout
        # (test_compiled_blocks_equal_eager_with_reorientation_inside).
        tokens = (self.x_embedder(x) + self.pos_embed).contiguous()
        c = self.t_embedder(t)
        if self.y_embedder is not None:
            if y is None:
                raise ValueError("this model is class-conditional: pass labels y (num_classes = null class)")
            c = c + self.y_embedder(y, self.training)
        elif y is not None:
            raise ValueError("this model is unconditional (num_classes=0) but labels were given")
        tokens = self.forward_blocks(tokens, c)
        return self.unpatchify(self.final_layer(tokens, c))

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float,
                         guided_channels: int | None = 3) -> torch.Tensor:
        """DiT's batched classifier-free guidance: the batch is [cond half; uncond half] (y of the second half
        is the null class); only the first half of x is used. Guidance is applied to the first 3 channels by
        default, as in DiT/DiG's released FID numbers; guided_channels=None guides all in_channels."""
        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half], dim=0), t, y)
        n = self.in_channels if guided_channels is None else guided_channels
        eps, rest = out[:, :n], out[:, n:]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        return torch.cat([torch.cat([half_eps, half_eps], dim=0), rest], dim=1)


def _inductor_options(mode: str | None, compile_kwargs: dict) -> dict:
    """torch.compile's options for `mode`, plus any given, with layout optimization off (compile_blocks says why)."""
    from torch._inductor import list_mode_options

    options = {**list_mode_options(mode or "default"), **compile_kwargs.pop("options", {})}
    if "TORCHINDUCTOR_LAYOUT_OPTIMIZATION" not in os.environ:
        options.setdefault("layout_optimization", False)
    return options
