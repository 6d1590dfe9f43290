"""GPU tests for the models (run on the GPU machine: `pytest -m gpu tests/test_gpu.py`; skipped without CUDA).

- DiG with GLA backends "triton" (our fused kernels) and "fla" (fla's chunk_gla) against the same weights in float64 with the exact PyTorch GLA,
  in fp32 and under bf16 autocast, outputs and parameter gradients; the fp32 torch backend is held to the
  same oracle so the bound is calibrated against a path without fla.
- A bf16-autocast training run of DiG-S/2 (default backend: triton) for 300 steps with DiT's diffusion loss: finite losses that fall.
- Regional compilation (`compile_blocks`) computes what the eager model computes.
"""
from __future__ import annotations

import copy

import pytest
import torch

from dig.diffusion import create_diffusion
from dig.models import create_model

pytestmark = pytest.mark.gpu


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def randomized_dig(seed=0, **overrides):
    """Small DiG with every parameter random (adaLN-Zero would otherwise switch each block off)."""
    torch.manual_seed(seed)
    model = create_model("DiG-S/2", depth=4, input_size=16, gla_backend="torch", **overrides)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adaLN_modulation" in name or "final_layer" in name:
                p.normal_(0, 0.05)
    return model.cuda()


def set_backend(model, backend):
    for block in model.blocks:
        block.attn.backend = backend
    return model


def forward_and_grads(model, x, t, y, autocast_dtype=None):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        out = model(x, t, y)
    (out.float() * torch.linspace(-1, 1, out.numel(), device=out.device).view_as(out)).sum().backward()
    return out.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("backend", ["triton", "fla"])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 3e-3), (torch.bfloat16, 3e-2)])
def test_dig_kernels_match_float64_torch_backend(dtype, tol, backend):
    model = randomized_dig().eval()
    n = 4
    x = torch.randn(n, 4, 16, 16, device="cuda")
    t = torch.randint(0, 1000, (n,), device="cuda")
    y = torch.randint(0, 1000, (n,), device="cuda")

    oracle = set_backend(copy.deepcopy(model).double(), "torch")
    ref_out, ref_grads = forward_and_grads(oracle, x.double(), t, y)

    autocast = dtype if dtype != torch.float32 else None
    fla_out, fla_grads = forward_and_grads(set_backend(model, backend), x, t, y, autocast)
    assert torch.isfinite(fla_out).all()
    assert rel(fla_out, ref_out) < tol
    worst = max(rel(fla_grads[k], ref_grads[k]) for k in ref_grads)
    assert worst < 5 * tol, worst
    # the GLA token mixers received gradient through the kernel
    assert all(fla_grads[f"blocks.{i}.attn.q_proj.weight"].abs().sum() > 0 for i in range(4))

    if dtype == torch.float32:  # calibration: the torch backend in fp32 lands well inside the same bound
        torch_out, _ = forward_and_grads(set_backend(model, "torch"), x, t, y)
        assert rel(torch_out, ref_out) < tol / 10


@pytest.mark.parametrize("backend", ["triton", "fla"])
def test_compiled_blocks_match_eager(backend):
    model = randomized_dig(seed=1).eval()
    set_backend(model, backend)
    x = torch.randn(2, 4, 16, 16, device="cuda")
    t = torch.randint(0, 1000, (2,), device="cuda")
    y = torch.randint(0, 1000, (2,), device="cuda")
    eager_out, eager_grads = forward_and_grads(model, x, t, y, torch.bfloat16)
    compiled = copy.deepcopy(model)
    compiled.compile_blocks()
    out, grads = forward_and_grads(compiled, x, t, y, torch.bfloat16)
    assert rel(out, eager_out) < 2e-2
    assert max(rel(grads[k], eager_grads[k]) for k in eager_grads) < 1e-1


@pytest.mark.parametrize("name", ["DiG-S/2", "DiT-S/2"])
def test_compiled_blocks_gradients_match_eager_fp32(name):
    """In float32 (no autocast) compiled and eager agree tightly, parameter by parameter: DiG's blocks reorient
    their input inside the graph (depth 5: all three kinds of block input), and the block inputs' layout once made
    inductor's input gradient wrong on the CPU (off by 3-37 %, which the bf16 test above would not see)."""
    torch.manual_seed(2)
    overrides = {"gla_backend": "triton"} if name.startswith("DiG") else {}
    model = create_model(name, depth=5, input_size=16, **overrides).cuda().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    x = torch.randn(4, 4, 16, 16, device="cuda")
    t = torch.randint(0, 1000, (4,), device="cuda")
    y = torch.randint(0, 1000, (4,), device="cuda")
    eager_out, eager_grads = forward_and_grads(model, x, t, y)
    compiled = copy.deepcopy(model)
    compiled.compile_blocks()
    out, grads = forward_and_grads(compiled, x, t, y)
    assert rel(out, eager_out) < 1e-4
    worst = max(eager_grads, key=lambda k: rel(grads[k], eager_grads[k]))
    assert rel(grads[worst], eager_grads[worst]) < 1e-3, (worst, rel(grads[worst], eager_grads[worst]))


def test_bf16_training_loss_is_finite_and_falls():
    torch.manual_seed(0)
    model = create_model("DiG-S/2", input_size=32).cuda().train()
    assert model.blocks[0].attn.backend == "auto"
    diffusion = create_diffusion()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-4, weight_decay=0.0)
    g = torch.Generator(device="cuda").manual_seed(0)
    # A fixed small "dataset" with spatial structure: smooth random fields, 10 classes.
    data = torch.nn.functional.interpolate(torch.randn(64, 4, 8, 8, device="cuda", generator=g), size=32,
                                           mode="bilinear", align_corners=False)
    data = data / data.std()
    labels = torch.arange(64, device="cuda") % 10
    losses = []
    for step in range(300):
        idx = torch.randint(0, 64, (32,), device="cuda", generator=g)
        t = torch.randint(0, 1000, (32,), device="cuda", generator=g)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            terms = diffusion.training_losses(model, data[idx], t, dict(y=labels[idx]))
        loss = terms["loss"].float().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(terms["mse"].float().mean().item())
    losses = torch.tensor(losses)
    assert torch.isfinite(losses).all()
    first, last = losses[:10].mean().item(), losses[-50:].mean().item()
    assert last < 0.6 * first, (first, last)


def test_compiled_dig_accepts_any_batch_and_resolution_in_one_process():
    """One process, compiled blocks, default backend (auto: triton when batch x heads fills the SMs, else fla):
    batch sizes on both sides of that threshold, an odd batch, two resolutions (a second model, as a run that
    samples at another size would build) and CFG's doubled batch all run and match the eager model. Dynamo
    marks the batch dynamic after the second shape; the backend choice must then work on symbolic sizes."""
    torch.manual_seed(0)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for input_size in (32, 64):  # 256 and 512 px latents
        eager = create_model("DiG-S/2", depth=2, input_size=input_size, num_classes=10).cuda().eval()
        with torch.no_grad():  # adaLN-Zero would switch every block and the output layer off
            for name, p in eager.named_parameters():
                if "adaLN_modulation" in name or "final_layer" in name:
                    p.normal_(0, 0.05)
        compiled = copy.deepcopy(eager)
        compiled.compile_blocks()
        heads = eager.num_heads
        below = max(1, (sms - 1) // heads)  # too few sequences for the fused kernel: fla's chunk_gla
        for n in (32, 31, 64, below):
            x = torch.randn(n, 4, input_size, input_size, device="cuda")
            t = torch.randint(0, 1000, (n,), device="cuda")
            y = torch.randint(0, 10, (n,), device="cuda")
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                ref, out = eager(x, t, y), compiled(x, t, y)
                assert rel(out, ref) < 2e-2, (input_size, n)
                y_cfg = torch.cat([y, torch.full_like(y, 10)])
                ref = eager.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]), y_cfg, cfg_scale=1.5)
                out = compiled.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]), y_cfg, cfg_scale=1.5)
                assert rel(out, ref) < 2e-2, (input_size, n, "cfg")
        # and training steps at two batch sizes
        compiled.train()
        for n in (32, 17):
            x = torch.randn(n, 4, input_size, input_size, device="cuda")
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = compiled(x, torch.randint(0, 1000, (n,), device="cuda"), torch.randint(0, 10, (n,), device="cuda"))
            out.float().square().mean().backward()
            assert all(torch.isfinite(p.grad).all() for p in compiled.parameters() if p.grad is not None)
