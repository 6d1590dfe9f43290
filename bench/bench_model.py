"""Training-step benchmark: img/s, peak memory and MFU of one optimiser step (forward, backward, AdamW) for a
registered model at an image resolution. Mixed precision as in DiT training: fp32 parameters and AdamW states,
bf16 autocast. Model FLOPs are counted analytically (3 x forward; recomputation under activation checkpointing
is not counted, so this is MFU, not hardware utilisation)."""
from __future__ import annotations

import gc
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from dig.models import create_model

from .common import median, time_ms


def forward_flops_per_image(model: nn.Module) -> float:
    """Matmul FLOPs of one forward pass for one image: per-token linears, the patch embedding, the token mixer
    (softmax attention 4*T*D per token; GLA's recurrent form 4*K*V per head per token), the depthwise conv,
    and the per-image conditioning linears (adaLN, timestep MLP)."""
    tokens = model.grid_size[0] * model.grid_size[1]
    per_token = per_image = 0.0
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            flops = 2.0 * m.in_features * m.out_features
            if "adaLN_modulation" in name or "t_embedder" in name:
                per_image += flops
            else:
                per_token += flops
        elif isinstance(m, nn.Conv2d):
            k = m.kernel_size[0] * m.kernel_size[1]
            per_token += 2.0 * k * m.in_channels // m.groups * m.out_channels
    d = model.hidden_size
    for block in model.blocks:
        attn = block.attn
        if hasattr(attn, "qkv"):  # softmax attention: QK^T and AV
            per_token += 4.0 * tokens * d
        else:  # GLA: state update k^T v and readout q S
            k_dim = attn.q_proj.out_features // attn.num_heads
            v_dim = attn.v_proj.out_features // attn.num_heads
            per_token += 4.0 * k_dim * v_dim * attn.num_heads
    return per_token * tokens + per_image


def make_inputs(model: nn.Module, batch: int, device: torch.device, seed: int = 0):
    g = torch.Generator(device=device).manual_seed(seed)
    h, w = model.latent_hw
    x = torch.randn(batch, model.in_channels, h, w, device=device, generator=g)
    t = torch.randint(0, 1000, (batch,), device=device, generator=g)
    y = torch.randint(0, max(model.num_classes, 1), (batch,), device=device, generator=g)
    target = torch.randn(batch, model.out_channels, h, w, device=device, generator=g)
    return x, t, (y if model.num_classes > 0 else None), target


# Step variants: eager; compile = regional compile (each block's forward compiled); graphs = regional compile with
# CUDA graphs (mode reduce-overhead, as the trainer's recipes run: at 32 images per GPU the ungraphed step is
# bound by the host's launches, not by the GPU)
VARIANTS = ("eager", "compile", "graphs")


def check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}: expected one of {', '.join(VARIANTS)}")


def build(name: str, resolution: int, device: torch.device, *, checkpointing: bool = False,
          compile_blocks: bool = False, cudagraphs: bool = False, **overrides) -> nn.Module:
    latent = resolution // 8
    with torch.device(device):  # initialise on the device: a CPU init of an XL model takes seconds
        model = create_model(name, input_size=latent, grad_checkpointing=checkpointing, **overrides)
    if compile_blocks:
        model.compile_blocks(mode="reduce-overhead" if cudagraphs else None)
    return model.train()


def build_step(name: str, resolution: int, batch: int, device: torch.device, *, compile_blocks: bool,
               cudagraphs: bool = False, checkpointing: bool = False, **overrides):
    """(model, step, optimizer) of bench's training step; cudagraphs (CUDA only, with compile_blocks): the blocks
    compiled with CUDA graphs and each step marked as a new one."""
    cudagraphs = cudagraphs and compile_blocks and device.type == "cuda"
    model = build(name, resolution, device, checkpointing=checkpointing, compile_blocks=compile_blocks,
                  cudagraphs=cudagraphs, **overrides)
    step, opt = train_step_fn(model, batch, device, cudagraphs=cudagraphs)
    return model, step, opt


def train_step_fn(model: nn.Module, batch: int, device: torch.device, cudagraphs: bool = False):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0, fused=device.type == "cuda")
    x, t, y, target = make_inputs(model, batch, device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16)

    def step():
        if cudagraphs:  # the previous step's graph outputs may be overwritten
            torch.compiler.cudagraph_mark_step_begin()
        with amp:
            out = model(x, t, y)
        loss = F.mse_loss(out.float(), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step, opt


def bench_train_step(name: str, resolution: int, batch: int, device: torch.device, *, variant: str = "eager",
                     checkpointing: bool = False, warmup: int = 2, repeat: int = 5, peak_tflops: float | None = None,
                     **overrides) -> dict:
    row = {"model": name, "res": resolution, "batch": batch, "variant": variant + ("+ckpt" if checkpointing else "")}
    check_variant(variant)
    graphs = variant == "graphs" and device.type == "cuda"
    free(device)
    t0 = time.perf_counter()
    model = opt = step = None
    try:
        model, step, opt = build_step(name, resolution, batch, device, compile_blocks=variant != "eager",
                                      cudagraphs=graphs, checkpointing=checkpointing, **overrides)
        if graphs:  # the graphs' memory is allocated while they are recorded (warm-up), not when they replay
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(warmup):
            loss = step()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {loss.item()}")
        if device.type == "cuda" and not graphs:
            torch.cuda.reset_peak_memory_stats(device)
        times = time_ms(step, device, warmup=0, repeat=repeat)
        ms = median(times)
        flops = 3 * forward_flops_per_image(model) * batch
        row.update(ms=ms, img_s=batch / (ms * 1e-3), tflops=flops / (ms * 1e-3) / 1e12,
                   spread=(max(times) - min(times)) / ms)
        if peak_tflops:
            row["mfu"] = row["tflops"] / peak_tflops
        if device.type == "cuda":
            row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    except torch.OutOfMemoryError:
        row["error"] = "OOM"
    except Exception as e:  # a failing configuration is reported in the table, the others still run
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
    finally:
        del model, opt, step
        free(device)
    row["wall_s"] = time.perf_counter() - t0
    return row


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
