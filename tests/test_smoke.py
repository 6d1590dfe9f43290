"""Smoke tests of the foundation: DiG-S/2 and DiT-S/2 (two blocks, 8x8 latents, 10 classes) learn a fixed
batch with the IDDPM loss, sample finite latents of the right shape, and guide as DiT does."""
from __future__ import annotations

import pytest
import torch

from dig.diffusion import create_diffusion, sample
from dig.models import create_model

LATENT = (4, 8, 8)
NUM_CLASSES = 10
STEPS = 30


@pytest.fixture(scope="module", params=["DiG-S/2", "DiT-S/2"])
def trained(request):
    """(model, losses) after STEPS AdamW steps on one fixed batch (fixed latents, labels, timesteps, noise).
    Two blocks keep it fast on CPU; with DiG they still cover a flip and a transpose of the scan."""
    torch.manual_seed(0)
    model = create_model(request.param, input_size=LATENT[1], num_classes=NUM_CLASSES, depth=2)
    diffusion = create_diffusion()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, *LATENT, generator=g)
    y = torch.randint(0, NUM_CLASSES, (4,), generator=g)
    t = torch.randint(0, diffusion.num_timesteps, (4,), generator=g)
    noise = torch.randn(x.shape, generator=g)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0, foreach=True)
    model.train()
    losses = []
    for _ in range(STEPS):
        loss = diffusion.training_losses(model, x, t, dict(y=y), noise=noise)["loss"].mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return model, losses


def test_training_drives_loss_down(trained):
    _, losses = trained
    assert all(torch.isfinite(torch.tensor(losses)))
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.3 * first, f"loss {first:.4f} -> {last:.4f}: {losses}"


@pytest.mark.parametrize("method,cfg_scale", [("ddpm", 1.0), ("ddpm", 4.0), ("ddim", 1.5)])
def test_sampling_gives_finite_latents(trained, method, cfg_scale):
    model, _ = trained
    labels = torch.tensor([0, 3, 9])
    out = sample(model, labels, LATENT, num_steps=4, cfg_scale=cfg_scale, method=method,
                 generator=torch.Generator().manual_seed(2))
    assert out.shape == (3, *LATENT)
    assert torch.isfinite(out).all()
    assert model.training  # sample() restores the mode it found


@pytest.mark.parametrize("guided_channels", [3, None])
def test_forward_with_cfg_matches_manual_formula(trained, guided_channels):
    """Guided noise = uncond + s * (cond - uncond) on the guided eps channels (DiT's default: the first 3);
    the remaining channels are the conditional half's output."""
    model, _ = trained
    model.eval()
    try:
        g = torch.Generator().manual_seed(3)
        x = torch.randn(2, *LATENT, generator=g)
        t = torch.tensor([10, 800])
        y, null = torch.tensor([1, 7]), torch.full((2,), NUM_CLASSES)
        s = 3.0
        with torch.no_grad():
            guided = model.forward_with_cfg(torch.cat([x, torch.randn_like(x)]), torch.cat([t, t]),
                                            torch.cat([y, null]), s, guided_channels=guided_channels)
            cond, uncond = model(x, t, y), model(x, t, null)
    finally:
        model.train()
    assert (cond - uncond).abs().max().item() > 1e-6  # otherwise the comparison says nothing
    n = LATENT[0] if guided_channels is None else guided_channels
    expected = cond.clone()
    expected[:, :n] = uncond[:, :n] + s * (cond[:, :n] - uncond[:, :n])
    torch.testing.assert_close(guided[:2], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(guided[2:, :n], guided[:2, :n])  # both halves carry the guided eps
