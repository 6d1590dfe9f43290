"""Does torch.compile (inductor) return the right input gradient for a transposed-layout input? A minimal form of
what a DiT/DiG block did with the patch embedding's output (a transposed view, kept by the + pos_embed sum) before
the model made block inputs contiguous: x1 = x + g * (layer_norm(x) @ W); out = x1 + layer_norm(x1).

On the CPU with torch 2.13 the compiled input gradient is off by ~100 % (float64) while the output agrees to
1e-15; with a contiguous input both agree. Run on a GPU to see whether the CUDA path (and its torch) has it too:

    python3 -m bench.check_inductor_layout_grad --device cuda
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def compare(device: str, dtype: torch.dtype, transposed: bool, width: int = 64) -> dict:
    torch._dynamo.reset()
    gen = torch.Generator(device="cpu").manual_seed(0)
    weight = (torch.randn(width, width, generator=gen, dtype=torch.float64) * 0.1).to(device, dtype)
    gate = torch.randn(2, 1, width, generator=gen, dtype=torch.float64).to(device, dtype)
    base = torch.randn(2, width, 4, generator=gen, dtype=torch.float64).to(device, dtype)

    def block(x):
        norm = lambda z: F.layer_norm(z, (width,), eps=1e-6)  # noqa: E731
        x1 = x + gate * (norm(x) @ weight)
        return x1 + norm(x1)

    results = []
    for fn in (block, torch.compile(block)):
        leaf = base.clone().requires_grad_(True)
        x = leaf.transpose(1, 2) if transposed else leaf.transpose(1, 2).contiguous()
        out = fn(x)
        out.square().mean().backward()
        results.append((out.detach(), leaf.grad))
    (ref, ref_grad), (out, grad) = results
    return {"device": device, "dtype": str(dtype).removeprefix("torch."), "input": "transposed" if transposed else
            "contiguous", "output_max_rel": max_rel(out, ref), "input_grad_max_rel": max_rel(grad, ref_grad)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    print(f"torch {torch.__version__}")
    for dtype in (torch.float32, torch.float64):
        for transposed in (True, False):
            print(json.dumps(compare(args.device, dtype, transposed)))


if __name__ == "__main__":
    main()
