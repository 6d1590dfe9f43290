"""Where activation memory goes: bytes autograd saves for backward in one block, per token, attributed to the
innermost module running when the tensor was saved (the block itself = the glue between its submodules:
modulate, gates, residual adds; `attn` itself = the forget-gate activation and the GLA kernel). Storages are
counted once; parameters and other tensors with fewer than 3 dimensions are left out.

Compiled (`compiled_activations`, the command line): what the whole model with compile_blocks saves (inductor
decides), per token and block, by tensor shape. What a graph saves does not depend on the device, so the CPU
(with DiG's Triton GLA through Triton's interpreter, whose operator saves what it saves on the GPU) gives the
GPU's numbers, without the allocator's fragmentation and workspaces:

    TRITON_INTERPRET=1 python -m bench.memory_breakdown --run DiT-XL/2 --run DiG-XL/2:gla_backend=triton \
        --run DiG-XL/2:gla_backend=triton,mlp_recompute=false
"""
from __future__ import annotations

import argparse
import json
import weakref
from collections import defaultdict

import torch
import torch.nn as nn

from .bench_model import build
from .common import literal


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


def compiled_activations(name: str, resolution: int, batch: int, device: torch.device, **overrides) -> dict:
    """Bytes autograd keeps for the backward of the model with compiled blocks (bf16 autocast, train mode), per
    token and block, in all and by (shape, dtype). Activations only: tensors shaped like a parameter or its
    transpose (the weights and their bf16 casts) are left out; storages are counted once."""
    model = build(name, resolution, device, compile_blocks=True, **overrides)
    h, w = model.latent_hw
    x = torch.randn(batch, model.in_channels, h, w, device=device)
    t, y = torch.randint(0, 1000, (batch,), device=device), torch.randint(0, model.num_classes, (batch,), device=device)
    weight_shapes = {s for p in model.parameters() for s in (tuple(p.shape), tuple(p.shape)[::-1])}  # and W^T
    amp = torch.autocast(device.type, dtype=torch.bfloat16)
    with amp:
        model(x, t, y).float().square().mean().backward()  # compiles
    packed: list[weakref.ref] = []

    def pack(z: torch.Tensor):
        packed.append(weakref.ref(z))
        return z

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda z: z), amp:
        out = model(x, t, y)
    # what autograd still holds once the forward is done (a branch that does not reach the output frees what it
    # saved right away, and its memory may be reused by a later saved tensor), each storage once
    seen: set[int] = set()
    by_shape: dict[tuple, int] = defaultdict(int)
    for ref in packed:
        z = ref()
        if z is None or tuple(z.shape) in weight_shapes or z.untyped_storage().data_ptr() in seen:
            continue
        seen.add(z.untyped_storage().data_ptr())
        by_shape[(tuple(z.shape), str(z.dtype).removeprefix("torch."))] += z.untyped_storage().nbytes()
    del out
    per = batch * model.grid_size[0] * model.grid_size[1] * len(model.blocks)
    top = sorted(by_shape.items(), key=lambda kv: -kv[1])
    return {"model": name, "overrides": overrides, "resolution": resolution, "batch": batch,
            "bytes_per_token_per_block": sum(by_shape.values()) / per,
            "by_shape": [{"shape": list(k[0]), "dtype": k[1], "bytes_per_token_per_block": v / per} for k, v in top]}


def _parse_run(spec: str) -> tuple[str, dict]:
    name, _, sets = spec.partition(":")
    overrides = {}
    for item in filter(None, sets.split(",")):
        key, _, value = item.partition("=")
        overrides[key] = literal(value)
    return name, overrides


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", action="append", required=True, metavar="MODEL[:KEY=VALUE,...]",
                   help="a model and its create_model overrides; ratios are to the first run")
    p.add_argument("--resolution", type=int, default=128, help="image side (128: 8x8 tokens)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--top", type=int, default=8, help="largest saved tensor kinds listed per run")
    p.add_argument("--json", default=None, metavar="PATH")
    a = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results = []
    for spec in a.run:
        name, overrides = _parse_run(spec)
        torch._dynamo.reset()
        results.append(compiled_activations(name, a.resolution, a.batch, device, **overrides))
    first = results[0]["bytes_per_token_per_block"]
    print(f"saved activations of the compiled model, bytes per token per block ({device.type}, {a.resolution} px, "
          f"batch {a.batch}, bf16 autocast)")
    print(f"{'run':<50}{'B/token/block':>15}{'vs first':>10}")
    for spec, r in zip(a.run, results):
        print(f"{spec:<50}{r['bytes_per_token_per_block']:>15.0f}{r['bytes_per_token_per_block'] / first:>10.3f}")
    for spec, r in zip(a.run, results):
        print(f"\n{spec}: largest saved tensor kinds")
        for kind in r["by_shape"][:a.top]:
            print(f"  {kind['bytes_per_token_per_block']:>9.0f}  {kind['dtype']:<9}{tuple(kind['shape'])}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": device.type, "runs": dict(zip(a.run, results))}, f, indent=1)


if __name__ == "__main__":
    main()
