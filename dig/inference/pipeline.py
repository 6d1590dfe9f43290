"""A loaded model, its VAE and latent normaliser: class labels in, PIL images out."""
from __future__ import annotations

import torch


class Pipeline:
    def __init__(self, model, vae, normalizer, info: dict, device):
        self.model, self.vae, self.normalizer, self.info, self.device = model, vae, normalizer, info, device
        self.latent_shape = tuple(info["latent_shape"])

    @property
    def classes(self) -> list[str] | None:
        return self.info.get("classes")

    @torch.no_grad()
    def sample_tensors(self, labels, num_steps: int = 250, method: str = "ddpm", cfg_scale: float = 4.0,
                       seed: int = 0) -> torch.Tensor:
        """[N, 3, H, W] in [-1, 1]; image i depends only on (seed, i, labels[i])."""
        from dig.diffusion import sample
        from dig.inference.sample_npz import sample_generator
        from dig.vae import decode

        labels = [int(y) for y in labels]
        generators = [sample_generator(seed, i, self.device) for i in range(len(labels))]
        latents = sample(self.model, labels, self.latent_shape, num_steps=num_steps, cfg_scale=cfg_scale,
                         method=method, generator=generators, device=self.device)
        return decode(self.vae, self.normalizer.denormalize(latents.float()))

    def sample(self, labels, num_steps: int = 250, method: str = "ddpm", cfg_scale: float = 4.0, seed: int = 0):
        """One PIL image per class label."""
        from PIL import Image

        from dig.inference.sample_npz import to_uint8

        pixels = to_uint8(self.sample_tensors(labels, num_steps, method, cfg_scale, seed))
        return [Image.fromarray(p) for p in pixels]


def load_pipeline(source: str, device: str | torch.device | None = None, vae: str | None = None) -> Pipeline:
    """`source`: a `dig export` folder, a run directory (its latest EMA weights) or a checkpoint folder. `vae`: a
    VAE spec (dig.vae.load_vae) instead of the one the training latents were made with."""
    from dig.inference.loading import load_model
    from dig.inference.normalizer import LatentNormalizer
    from dig.vae import load_vae

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, info = load_model(source, device=device)
    return Pipeline(model, load_vae(vae or info["vae"], device=device),
                    LatentNormalizer.from_dict(info["normalizer"]), info, device)
