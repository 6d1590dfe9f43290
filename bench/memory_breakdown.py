"""Where activation memory goes: bytes autograd saves for backward in one block, per token, attributed to the
innermost module running when the tensor was saved (the block itself = the glue between its submodules:
modulate, gates, residual adds; `attn` itself = the forget-gate activation and the GLA kernel). Storages are
counted once; parameters and other tensors with fewer than 3 dimensions are left out."""
from __future__ import annotations

from collections import defaultdict

import torch
import torch.nn as nn

from .bench_model import build


def saved_bytes_per_token(block: nn.Module, args: tuple, tokens: int, device: torch.device) -> dict[str, float]:
    stack: list[str] = []
    handles = []
    for name, module in block.named_modules():
        handles.append(module.register_forward_pre_hook(lambda m, i, name=name: stack.append(name or "block")))
        handles.append(module.register_forward_hook(lambda m, i, o: stack.pop() and None))
    per_module: dict[str, int] = defaultdict(int)
    seen: set[int] = set()
    params = {p.untyped_storage().data_ptr() for p in block.parameters()}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if t.dim() >= 3 and key not in seen and key not in params:
            seen.add(key)
            per_module[stack[-1] if stack else "outside"] += storage.nbytes()
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                torch.autocast(device.type, dtype=torch.bfloat16):
            block(*args)
    finally:
        for h in handles:
            h.remove()
    result = {k: v / tokens for k, v in sorted(per_module.items(), key=lambda kv: -kv[1])}
    result["TOTAL"] = sum(per_module.values()) / tokens
    return result


def breakdown(name: str, resolution: int, batch: int, device: torch.device) -> dict[str, float]:
    model = build(name, resolution, device)
    block = model.blocks[1]
    tokens = batch * model.grid_size[0] * model.grid_size[1]
    x = torch.randn(batch, model.grid_size[0] * model.grid_size[1], model.hidden_size, device=device,
                    requires_grad=True)
    c = torch.randn(batch, model.hidden_size, device=device)
    args = (x, c, model.grid_size) if hasattr(block, "dw_conv") else (x, c)
    result = saved_bytes_per_token(block, args, tokens, device)
    del model
    return result
