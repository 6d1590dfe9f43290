"""The latent shard format: the one contract between `data_pipeline` (writer) and the trainer (reader).

A dataset is a folder (local path or s3:// prefix) holding
  {name}-000000.tar ...      webdataset shards; one sample per source image
  {name}-000000.done.json    per-shard completion record, written only after the tar is complete
  manifest.json              written last: format, geometry, VAE, classes, every shard with its keys and count
  latent_stats.json          per-channel mean/std of the posterior means (written with the manifest)
  rejects.jsonl              inputs that could not be decoded, one JSON object per line, with the reason

A sample inside a shard has the webdataset key `SAMPLE_KEY_FORMAT.format(index)` (a global, dense index in
the sorted input listing: keys never contain dots or slashes, which webdataset would split on) and fields
  mean.npy   [2, C, h, w]   VAE posterior mean for (original, horizontally flipped) image, dtype per manifest
  std.npy    [2, C, h, w]   VAE posterior std, same layout
  cls        class index as ASCII decimal
  json       {"source": original input key, "class_name": str}
Latents are stored *unscaled*; the trainer multiplies by the VAE scaling factor (or normalises with
latent_stats.json).
"""
from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

FORMAT_VERSION = "dig-latents/v1"
SAMPLE_KEY_FORMAT = "{:010d}"
MANIFEST_NAME = "manifest.json"
STATS_NAME = "latent_stats.json"
REJECTS_NAME = "rejects.jsonl"
NUM_FLIPS = 2
STORAGE_DTYPES = ("float16", "float32")


def shard_name(name: str, index: int) -> str:
    return f"{name}-{index:06d}.tar"


def shard_done_name(name: str, index: int) -> str:
    return f"{name}-{index:06d}.done.json"


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _npy_load(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def encode_sample(index: int, source: str, label: int, class_name: str,
                  mean: np.ndarray, std: np.ndarray, dtype: str = "float16") -> dict[str, Any]:
    """Build the webdataset sample dict (field -> bytes) for one source image."""
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"storage dtype must be one of {STORAGE_DTYPES}, got {dtype!r}")
    if mean.shape != std.shape or mean.ndim != 4 or mean.shape[0] != NUM_FLIPS:
        raise ValueError(f"mean/std must both be [{NUM_FLIPS}, C, h, w]; got {mean.shape} and {std.shape}")
    return {
        "__key__": SAMPLE_KEY_FORMAT.format(index),
        "mean.npy": _npy_bytes(np.ascontiguousarray(mean, dtype=dtype)),
        "std.npy": _npy_bytes(np.ascontiguousarray(std, dtype=dtype)),
        "cls": str(int(label)).encode("ascii"),
        "json": json.dumps({"source": source, "class_name": class_name}).encode("utf-8"),
    }


@dataclass
class LatentSample:
    key: str
    mean: np.ndarray  # [2, C, h, w]
    std: np.ndarray   # [2, C, h, w]
    label: int
    source: str
    class_name: str


def decode_sample(sample: dict[str, Any]) -> LatentSample:
    """Inverse of `encode_sample` for a raw (undecoded) webdataset sample dict."""
    missing = [f for f in ("mean.npy", "std.npy", "cls", "json") if f not in sample]
    if missing:
        raise ValueError(f"sample {sample.get('__key__')!r} lacks fields {missing} (not a {FORMAT_VERSION} shard?)")
    meta = json.loads(sample["json"])
    return LatentSample(
        key=sample["__key__"],
        mean=_npy_load(sample["mean.npy"]),
        std=_npy_load(sample["std.npy"]),
        label=int(sample["cls"]),
        source=meta["source"],
        class_name=meta.get("class_name", ""),
    )


@dataclass
class ShardEntry:
    name: str          # file name relative to the dataset root, e.g. "train-000003.tar"
    count: int         # samples in the shard
    keys: list[str]    # source keys, in the order they appear in the shard


@dataclass
class Manifest:
    resolution: int            # image side in pixels
    latent_channels: int
    latent_size: int           # latent side = resolution // vae downsampling
    vae: str                   # hub id or path the latents were made with
    scaling_factor: float      # multiply stored latents by this for training (0.18215 for sd-vae-ft-ema)
    dtype: str                 # storage dtype of mean/std
    classes: list[str]         # class index -> class name
    shards: list[ShardEntry] = field(default_factory=list)
    name: str = "train"
    format: str = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_samples(self) -> int:
        return sum(s.count for s in self.shards)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "Manifest":
        data = json.loads(text)
        if data.get("format") != FORMAT_VERSION:
            raise ValueError(f"manifest format {data.get('format')!r} is not {FORMAT_VERSION!r}")
        data["shards"] = [ShardEntry(**s) for s in data.get("shards", [])]
        return cls(**data)


@dataclass
class LatentStats:
    """Contents of latent_stats.json: per-channel statistics of the stored (unscaled) posterior means, taken
    over every sample, both flips and every latent position."""
    mean: list[float]      # [C]
    std: list[float]       # [C], population standard deviation
    count: int             # values per channel the statistics cover
    over: str = "posterior mean, both flips, unscaled"

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "LatentStats":
        return cls(**json.loads(text))
