"""Sample grids: class-conditional samples from a model, decoded by the VAE, tiled into one image."""
from __future__ import annotations

import math

import numpy as np
import torch


def grid_labels(num_images: int, num_classes: int) -> list[int]:
    """Labels spread evenly over the classes (the same every time, so grids are comparable across steps)."""
    return [int(i * num_classes / num_images) % num_classes for i in range(num_images)]


def grid_shape(n: int) -> tuple[int, int]:
    """(rows, columns) that hold exactly n cells, as square as possible: 16 -> 4x4, 8 -> 2x4 (no empty cell)."""
    rows = max(r for r in range(1, math.isqrt(max(n, 1)) + 1) if n % r == 0)
    return rows, max(n, 1) // rows


def tile(images: torch.Tensor, nrow: int | None = None, captions: list[str] | None = None):
    """[N, 3, H, W] in [-1, 1] → a PIL image with the samples in a grid of `nrow` columns (default: the full
    grid of `grid_shape`), each with its caption (e.g. the class name) in a strip under it when given."""
    from PIL import Image

    n, c, h, w = images.shape
    nrow = nrow or grid_shape(n)[1]
    rows = math.ceil(n / nrow)
    strip = _caption_height(h) if captions else 0
    pixels = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    canvas = np.zeros((rows * (h + strip), nrow * w, c), dtype=np.uint8)
    for i, img in enumerate(pixels):
        r, col = divmod(i, nrow)
        top = r * (h + strip)
        canvas[top:top + h, col * w:(col + 1) * w] = img
    grid = Image.fromarray(canvas)
    if captions:
        _draw_captions(grid, captions, nrow, h, w, strip)
    return grid


def _caption_height(cell: int) -> int:
    return max(10, min(24, cell // 5))


def _draw_captions(grid, captions: list[str], nrow: int, h: int, w: int, strip: int) -> None:
    from PIL import ImageDraw, ImageFont

    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default(size=strip - 2)
    for i, text in enumerate(captions):
        r, col = divmod(i, nrow)
        while len(text) > 1 and draw.textlength(text, font=font) > w - 2:  # cut to the cell's width
            text = text[:-2] + "~"
        draw.text((col * w + 1, r * (h + strip) + h), text, fill=(255, 255, 255), font=font)


@torch.no_grad()
def sample_grid(model, vae, normalizer, labels: list[int], latent_shape, num_steps: int, method: str,
                cfg_scale: float, seed: int, device, progress: bool = False, class_names: list[str] | None = None):
    """Sample one latent per label, undo the training normalisation, decode, tile (with each sample's class name
    under it when `class_names` is given). Image i depends only on (seed, i, labels[i]): the same picture as
    `Pipeline.sample` and `dig sample … --out X.npz` give for index i."""
    from dig.diffusion import sample
    from dig.inference.sample_npz import sample_generator
    from dig.vae import decode

    generator = [sample_generator(seed, i, device) for i in range(len(labels))]
    latents = sample(model, labels, latent_shape, num_steps=num_steps, cfg_scale=cfg_scale, method=method,
                     generator=generator, device=device, progress=progress)
    images = decode(vae, normalizer.denormalize(latents.float()))
    captions = [class_names[label] if label < len(class_names) else str(label) for label in labels] \
        if class_names else None
    return tile(images, captions=captions)
