"""DiT's IDDPM diffusion. `create_diffusion` builds a (respaced) process; `sample` draws latents from a model."""
from __future__ import annotations

from .gaussian_diffusion import GaussianDiffusion, mean_flat
from .schedule import beta_schedule, space_timesteps


def create_diffusion(timestep_respacing: str | int = "", noise_schedule: str = "linear", learn_sigma: bool = True,
                     diffusion_steps: int = 1000) -> GaussianDiffusion:
    """DiT's setup: `diffusion_steps` training steps of `noise_schedule`, epsilon prediction, learned-range
    variance with the hybrid loss when `learn_sigma` (else fixed-large variance and MSE only), restricted to
    the steps `timestep_respacing` keeps ("" = all, "250", "ddim50", "10,20,…")."""
    betas = beta_schedule(noise_schedule, diffusion_steps)
    return GaussianDiffusion(betas, space_timesteps(diffusion_steps, timestep_respacing), learn_sigma=learn_sigma)


from .sampling import sample  # noqa: E402  (sampling builds on create_diffusion)

__all__ = ["GaussianDiffusion", "beta_schedule", "create_diffusion", "mean_flat", "sample", "space_timesteps"]
