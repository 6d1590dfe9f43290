"""The device half of the encoder stage as one module (what `compile_encoder` hands to torch.compile): a batch of
uint8 crops -> posterior mean/std of each crop and of its mirror image, in the storage dtype.

Imported by LatentEncoder when an actor starts (it imports torch; the job's driver does not need it)."""
from __future__ import annotations

import torch

from dig.vae import PosteriorEncoder, fuse_group_norms

MEMORY_FORMATS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}


class EncodeStep(torch.nn.Module):
    """uint8 [B, H, W, 3] -> (mean, std), each [B, 2, C, h, w] in `storage_dtype`; [:, 1] is the mirror image.

    Image and mirror image go through the VAE as one batch of 2B rows. The mirror is taken while a pixel is still
    one byte; the [-1, 1] scaling is done in float32 and rounded once to the network's dtype (as an fp32 encode
    of the same pixels would see them, up to that one rounding)."""

    def __init__(self, posterior: PosteriorEncoder, device: str, dtype: torch.dtype, memory_format: str,
                 storage_dtype: torch.dtype, fused_group_norm: bool = False):
        super().__init__()
        if fused_group_norm:  # GroupNorm + SiLU as one Triton op; LatentEncoder decides where that applies
            fuse_group_norms(posterior)
        self.memory_format = MEMORY_FORMATS[memory_format]
        # The weights get the activations' layout too: a conv whose input and weight disagree converts one of
        # them on every call.
        self.posterior = posterior.to(device=device, dtype=dtype, memory_format=self.memory_format)
        self.dtype = dtype
        self.storage_dtype = storage_dtype

    def forward(self, crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch = crops.shape[0]
        x = crops.permute(0, 3, 1, 2)  # NCHW view of NHWC memory, i.e. already channels-last strides
        x = torch.cat([x, x.flip(-1)])
        x = (x.float() / 127.5 - 1.0).to(self.dtype).contiguous(memory_format=self.memory_format)
        mean, std = self.posterior(x)
        return (mean.unflatten(0, (2, batch)).transpose(0, 1).to(self.storage_dtype),
                std.unflatten(0, (2, batch)).transpose(0, 1).to(self.storage_dtype))
