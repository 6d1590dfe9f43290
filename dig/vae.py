"""The latent autoencoder: loading (hub id, local diffusers folder, or an architecture built from a config),
encoding images to the posterior mean/std, decoding latents back to images.

Specs accepted by `load_vae`:
  "stabilityai/sd-vae-ft-ema" (any hub id)  -> AutoencoderKL.from_pretrained; needs the network or HF cache
  "/path/to/folder"                         -> a local diffusers AutoencoderKL folder
  "config:sd"                               -> the sd-vae-ft-ema *architecture* with random weights (benchmarks)
  "config:tiny"                             -> a small 8x-downsampling VAE with random weights (tests, demo)
Random-weight VAEs are for tests, benchmarks and the offline demo: `load_vae` warns loudly when it builds one.
"""
from __future__ import annotations

import logging
import os
import warnings

import torch

log = logging.getLogger(__name__)

SD_VAE_ID = "stabilityai/sd-vae-ft-ema"
SD_SCALING_FACTOR = 0.18215

CONFIGS = {
    # Architecture of sd-vae-ft-ema (diffusers AutoencoderKL defaults plus the SD block widths).
    "sd": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
               down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
               norm_num_groups=32, sample_size=256, scaling_factor=SD_SCALING_FACTOR),
    # Smallest VAE with the same 8x downsampling and 4 latent channels.
    "tiny": dict(block_out_channels=(32, 64, 64, 64), layers_per_block=1, latent_channels=4,
                 down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                 norm_num_groups=32, sample_size=256, scaling_factor=SD_SCALING_FACTOR),
}


def build_vae_from_config(name: str, seed: int = 0):
    from diffusers import AutoencoderKL

    if name not in CONFIGS:
        raise ValueError(f"unknown VAE config {name!r}; choose one of {sorted(CONFIGS)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKL(**CONFIGS[name])


class _EmptyFp32ListFilter(logging.Filter):
    """diffusers warns "There are modules in AutoencoderKL that should be kept in float32: []" on every
    `.to(dtype)`; with an empty list there is nothing to keep, so that one message is dropped (a non-empty list
    still shows)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("There are modules in") and "should be kept in float32: []" in message)


def _quiet_diffusers() -> None:
    target = logging.getLogger("diffusers.models.modeling_utils")
    if not any(isinstance(f, _EmptyFp32ListFilter) for f in target.filters):
        target.addFilter(_EmptyFp32ListFilter())


def _from_pretrained(spec: str):
    from diffusers import AutoencoderKL
    from diffusers.utils import is_accelerate_available

    with warnings.catch_warnings():
        # diffusers still passes huggingface_hub's retired `local_dir_use_symlinks` argument (harmless)
        warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*", category=UserWarning)
        # low_cpu_mem_usage needs accelerate; asking for it without accelerate only prints a warning
        return AutoencoderKL.from_pretrained(spec, low_cpu_mem_usage=is_accelerate_available())


def load_vae(spec: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """Load the VAE named by `spec` (see module doc), in eval mode, on `device` in `dtype`."""
    _quiet_diffusers()

    if spec.startswith("config:"):
        name = spec.split(":", 1)[1]
        warnings.warn(f"VAE {spec!r}: building the {name!r} architecture with RANDOM weights; latents and "
                      "decoded images are meaningless (fine for tests, benchmarks and the offline demo)",
                      stacklevel=2)
        vae = build_vae_from_config(name)
    elif os.path.isdir(spec):
        vae = _from_pretrained(spec)
    else:
        try:
            vae = _from_pretrained(spec)
        except Exception as exc:  # noqa: BLE001 - re-raised with what to do about it
            raise RuntimeError(
                f"could not load VAE {spec!r} from the hub or its cache ({type(exc).__name__}: {exc}). "
                "On an offline machine download it once elsewhere and pass the local folder, "
                "or use 'config:tiny' for a random-weight test VAE.") from exc
    return vae.to(device=device, dtype=dtype).eval().requires_grad_(False)


def downsample_factor(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def scaling_factor(vae) -> float:
    return float(getattr(vae.config, "scaling_factor", SD_SCALING_FACTOR) or SD_SCALING_FACTOR)


@torch.no_grad()
def encode(vae, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """images in [-1, 1], [N, 3, H, W] -> posterior (mean, std), each [N, C, H/f, W/f], unscaled.

    Through diffusers' own `AutoencoderKL.encode` (the reference); the preprocessing encoder runs
    `PosteriorEncoder`, which computes the same thing without the decoder and the distribution object."""
    dist = vae.encode(images.to(device=vae.device, dtype=vae.dtype)).latent_dist
    return dist.mean, dist.std


class PosteriorEncoder(torch.nn.Module):
    """The encoder half of an AutoencoderKL as a plain tensor-in, tensors-out module: images in [-1, 1]
    [N, 3, H, W] -> posterior (mean, std), each float32 [N, C, H/f, W/f], unscaled.

    What `AutoencoderKL.encode` does (encoder, quant_conv, DiagonalGaussianDistribution's mean and
    exp(0.5 * clamp(logvar, -30, 20))) minus what the pipeline does not need: no decoder on the device, no
    variance, no distribution object (so torch.compile sees one tensor graph). The std is taken in float32 from
    the network's logvar, so a bf16/fp16 network loses no further precision in the exp."""

    def __init__(self, vae):
        super().__init__()
        if getattr(vae, "use_tiling", False) or getattr(vae, "use_slicing", False):
            raise ValueError("PosteriorEncoder runs the whole batch at once; disable the VAE's tiling/slicing")
        self.encoder = vae.encoder
        self.quant_conv = vae.quant_conv  # None in VAEs built with use_quant_conv=False

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        moments = self.encoder(images)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = moments.float().chunk(2, dim=1)
        return mean, torch.exp(0.5 * logvar.clamp(-30.0, 20.0))


class GroupNormSiLU(torch.nn.GroupNorm):
    """A GroupNorm (same parameters, same state-dict names) that also applies the SiLU following it when `silu`,
    through `dig.ops.group_norm_triton` (Triton kernels for channels-last activations on CUDA, else torch)."""

    def __init__(self, norm: torch.nn.GroupNorm, silu: bool):
        super().__init__(norm.num_groups, norm.num_channels, norm.eps, norm.affine, device="meta")
        self.weight, self.bias = norm.weight, norm.bias
        self.silu = silu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from dig.ops.group_norm_triton import group_norm_silu

        return group_norm_silu(x, self.num_groups, self.weight, self.bias, self.eps, self.silu)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", silu={self.silu}"


def fuse_group_norms(module: torch.nn.Module) -> int:
    """Swap every torch GroupNorm under `module` for a GroupNormSiLU, in place, folding in the SiLU that follows it
    where the diffusers block runs one right after: a ResnetBlock2D without a time embedding (norm1 -> SiLU,
    norm2 -> SiLU; its `nonlinearity` becomes Identity) and the encoder's conv_norm_out -> conv_act. Other
    GroupNorms (the attention's) keep no activation. Returns how many norms took their SiLU in."""
    from diffusers.models.resnet import ResnetBlock2D

    def silu_module(m) -> bool:
        return type(m) is torch.nn.SiLU

    fused = 0
    for block in list(module.modules()):
        if (isinstance(block, ResnetBlock2D) and block.time_emb_proj is None
                and block.time_embedding_norm == "default" and silu_module(block.nonlinearity)
                and type(block.norm1) is torch.nn.GroupNorm and type(block.norm2) is torch.nn.GroupNorm):
            block.norm1, block.norm2 = GroupNormSiLU(block.norm1, True), GroupNormSiLU(block.norm2, True)
            block.nonlinearity = torch.nn.Identity()
            fused += 2
        elif (type(getattr(block, "conv_norm_out", None)) is torch.nn.GroupNorm
              and silu_module(getattr(block, "conv_act", None))):
            block.conv_norm_out, block.conv_act = GroupNormSiLU(block.conv_norm_out, True), torch.nn.Identity()
            fused += 1
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.GroupNorm:
                setattr(parent, name, GroupNormSiLU(child, False))
    return fused


@torch.no_grad()
def decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """Unscaled latents [N, C, h, w] -> images in [-1, 1], [N, 3, h*f, w*f]."""
    return vae.decode(latents.to(device=vae.device, dtype=vae.dtype)).sample.clamp(-1, 1)
