"""Sample grids: class-conditional samples from a model, decoded by the VAE, tiled into one image."""
from __future__ import annotations

import math

import numpy as np
import torch


def grid_labels(num_images: int, num_classes: int) -> list[int]:
    """Labels spread evenly over the classes (the same every time, so grids are comparable across steps)."""
    return [int(i * num_classes / num_images) % num_classes for i in range(num_images)]


def tile(images: torch.Tensor, nrow: int | None = None):
    """[N, 3, H, W] in [-1, 1] → a PIL image with the samples in a grid of `nrow` columns."""
    from PIL import Image

    n, c, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    pixels = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    canvas = np.zeros((rows * h, nrow * w, c), dtype=np.uint8)
    for i, img in enumerate(pixels):
        r, col = divmod(i, nrow)
        canvas[r * h:(r + 1) * h, col * w:(col + 1) * w] = img
    return Image.fromarray(canvas)


@torch.no_grad()
def sample_grid(model, vae, normalizer, labels: list[int], latent_shape, num_steps: int, method: str,
                cfg_scale: float, seed: int, device, progress: bool = False):
    """Sample one latent per label, undo the training normalisation, decode, tile. Image i depends only on
    (seed, i, labels[i]): the same picture as `Pipeline.sample` and `dig sample … --out X.npz` give for index i."""
    from dig.diffusion import sample
    from dig.inference.sample_npz import sample_generator
    from dig.vae import decode

    generator = [sample_generator(seed, i, device) for i in range(len(labels))]
    latents = sample(model, labels, latent_shape, num_steps=num_steps, cfg_scale=cfg_scale, method=method,
                     generator=generator, device=device, progress=progress)
    images = decode(vae, normalizer.denormalize(latents.float()))
    return tile(images)
