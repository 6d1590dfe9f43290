"""Settings of one preprocessing run: a YAML file (configs/preprocess/*.yaml), then command-line flags on top."""
from __future__ import annotations

from typing import Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field


class PipelineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input: str = Field(description="ImageFolder tree or folder of webdataset tars (local path or s3://)")
    output: str = Field(description="where the shards go (local folder or s3://bucket/prefix)")
    input_layout: Literal["auto", "folder", "webdataset"] = "auto"  # ImageFolder tree or *.tar; auto: detected
    resolution: int = Field(256, ge=8, description="image side after the ADM centre crop")
    vae: str = Field("stabilityai/sd-vae-ft-ema", description="hub id, local diffusers folder, or config:NAME")
    name: str = Field("train", pattern=r"^[A-Za-z0-9_-]+$", description="shard name prefix")
    shard_size: int = Field(1000, ge=1, description="samples (input images) per shard")
    shuffle: bool = Field(True, description="deal inputs into shards in a seeded pseudo-random order, so every "
                          "shard mixes classes; false: consecutive inputs of the sorted listing per shard")
    shuffle_seed: int = Field(0, ge=0, description="seed of the shard assignment (numpy default_rng)")
    storage_dtype: Literal["float16", "float32"] = "float16"  # dtype of the stored posterior mean/std
    min_side: int = Field(32, ge=1, description="images whose shorter side is below this are rejected")

    # Encoder actors.
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"  # encoder arithmetic
    device: Literal["auto", "cuda", "cpu"] = "auto"  # encoder device; auto: GPU actors when the cluster has GPUs
    encode_batch_size: int = Field(64, ge=1, description="images per VAE forward (each also flipped: 2x rows)")
    memory_format: Literal["auto", "channels_last", "contiguous"] = Field(
        "auto", description="encoder tensor layout; auto: channels_last on a GPU for the compiled encoder or with "
        "fused_group_norm, contiguous (NCHW) otherwise (the faster of the two on an H200 in each case, BENCHMARKS.md)")
    compile_encoder: bool = Field(
        False, description="torch.compile the encoder for one fixed batch shape (a shard's last chunk is padded "
        "to it); each actor compiles when it starts (needs Triton and a C compiler on GPU nodes)")
    compile_mode: Literal["default", "max-autotune-no-cudagraphs"] = Field(
        "default", description="torch.compile mode with compile_encoder; max-autotune-no-cudagraphs also times "
        "Triton convolution templates against cuDNN (a much longer compile)")
    fused_group_norm: bool = Field(
        True, description="on GPUs, the encoder's GroupNorm (+ the SiLU after it) through Triton kernels that read "
        "channels-last activations (dig/ops/group_norm_triton.py; Triton builds its launcher with the node's C "
        "compiler); if they cannot launch, a warning and torch's GroupNorm; on CPUs torch's GroupNorm")
    num_encoders: Optional[int] = Field(None, ge=1, description="encoder actors, one GPU each on GPU; default: "
                                        "one per GPU of the cluster, or 1 without GPUs")
    encoder_cpus: float = Field(1.0, gt=0, description="CPUs reserved per encoder actor")

    # Decode and write tasks.
    decode_cpus: float = Field(1.0, gt=0, description="CPUs per decode task (one task decodes one shard)")
    io_threads: int = Field(16, ge=1, description="parallel reads of input images inside a decode task")
    max_decode_tasks: Optional[int] = Field(None, ge=1, description="cap on concurrent decode tasks")

    ray_address: Optional[str] = Field(None, description="Ray cluster; default RAY_ADDRESS, else a local Ray")


def load_config(path: str | None, overrides: dict) -> PipelineConfig:
    data = {}
    if path:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of settings")
    data.update({k: v for k, v in overrides.items() if v is not None})
    return PipelineConfig(**data)
