"""DiG pretraining system: models, GLA ops, diffusion, latent shard reading, ZeRO-3 training."""

__version__ = "0.1.0"
