"""Drawing latents from a class-conditional DiT-style model, with classifier-free guidance."""
from __future__ import annotations

import torch


@torch.no_grad()
def sample(model, labels, latent_shape, num_steps: int = 250, cfg_scale: float = 1.5, method: str = "ddpm",
           generator: torch.Generator | None = None, device=None, eta: float = 0.0,
           progress: bool = False) -> torch.Tensor:
    """Sample one latent per label: [N, C, h, w], scaled as the model was trained on (decode with
    vae.decode(latents / scaling_factor)).

    `model` has DiT's interface: model(x, t, y), model.forward_with_cfg(x, t, y, cfg_scale), num_classes,
    in_channels, learn_sigma. `latent_shape` is (C, h, w). `num_steps` evenly respaced steps of the 1000 the
    model was trained on; `method` "ddpm" (ancestral) or "ddim" (with `eta`). With cfg_scale > 1 the batch is
    doubled with the null class (= num_classes) and the model's forward_with_cfg guides the noise prediction.
    The model runs in eval mode (label dropout off); its previous mode is restored afterwards.
    `generator` may be a list with one generator per label: each sample then draws all its noise from its own
    generator and does not depend on what else is in the batch.
    """
    from . import create_diffusion
    from .gaussian_diffusion import randn

    if method not in ("ddpm", "ddim"):
        raise ValueError(f"unknown sampling method {method!r}; choose 'ddpm' or 'ddim'")
    if cfg_scale < 1.0:
        raise ValueError(f"cfg_scale must be >= 1 (1 = no guidance), got {cfg_scale}")
    latent_shape = tuple(latent_shape)
    if len(latent_shape) != 3:
        raise ValueError(f"latent_shape must be (C, h, w), got {latent_shape}")
    if latent_shape[0] != model.in_channels:
        raise ValueError(f"latent_shape has {latent_shape[0]} channels, the model takes {model.in_channels}")
    if device is None:
        device = next(model.parameters()).device
    labels = torch.as_tensor(labels, dtype=torch.long, device=device).reshape(-1)
    if labels.numel() and (labels.min() < 0 or labels.max() >= model.num_classes):
        raise ValueError(f"labels must lie in [0, {model.num_classes}); got {labels.tolist()}")

    diffusion = create_diffusion(str(num_steps), learn_sigma=model.learn_sigma)
    n = labels.shape[0]
    z = randn((n, *latent_shape), generator, device)
    if cfg_scale > 1.0:
        # Both halves start from the same noise; forward_with_cfg reads only the first half of x.
        z = torch.cat([z, z])
        if isinstance(generator, (list, tuple)):
            generator = [*generator, *generator]  # the null half's step noise (unused) from the same streams
        null = torch.full_like(labels, model.num_classes)
        model_fn, model_kwargs = model.forward_with_cfg, dict(y=torch.cat([labels, null]), cfg_scale=cfg_scale)
    else:
        model_fn, model_kwargs = model, dict(y=labels)

    was_training = model.training
    model.eval()
    try:
        if method == "ddpm":
            out = diffusion.p_sample_loop(model_fn, z.shape, noise=z, model_kwargs=model_kwargs,
                                          progress=progress, generator=generator)
        else:
            out = diffusion.ddim_sample_loop(model_fn, z.shape, noise=z, model_kwargs=model_kwargs,
                                             progress=progress, eta=eta, generator=generator)
    finally:
        model.train(was_training)
    return out[:n]
