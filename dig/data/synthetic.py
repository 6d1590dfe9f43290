"""A synthetic latent dataset in the shard format (dig.data.shard_format), for tests, benchmarks and smoke runs.

Latents are random (seeded) posterior means/stds of the right geometry, written with webdataset's TarWriter
exactly as data_pipeline writes real ones, to a local folder or an s3:// prefix.
"""
from __future__ import annotations

import io
import json

import numpy as np

from . import storage
from .shard_format import (MANIFEST_NAME, STATS_NAME, LatentStats, Manifest, ShardEntry, encode_sample,
                           shard_done_name, shard_name)


def synthetic_sample(index: int, channels: int, latent_size: int, num_classes: int, seed: int = 0):
    """(label, mean [2,C,h,w], std [2,C,h,w]) of sample `index`: the flipped mean is the mirror image."""
    rng = np.random.default_rng([seed, index])
    label = int(rng.integers(num_classes))
    mean0 = rng.standard_normal((channels, latent_size, latent_size)).astype(np.float32) * 4.0
    std0 = rng.uniform(0.05, 0.5, (channels, latent_size, latent_size)).astype(np.float32)
    mean = np.stack([mean0, mean0[..., ::-1]])
    std = np.stack([std0, std0[..., ::-1]])
    return label, mean, std


def write_synthetic_dataset(root: str, *, num_shards: int = 4, samples_per_shard: int | list[int] = 8,
                            latent_size: int = 8, channels: int = 4, num_classes: int = 10,
                            resolution: int | None = None, dtype: str = "float32", vae: str = "config:tiny",
                            scaling_factor: float = 0.18215, seed: int = 0, name: str = "train",
                            nonfinite_indices: frozenset[int] = frozenset()) -> Manifest:
    """Write shards + done records + latent_stats.json + manifest.json under `root`; returns the manifest.
    Samples whose global index is in `nonfinite_indices` get NaN means (bad-input tests)."""
    import webdataset as wds

    counts = samples_per_shard if isinstance(samples_per_shard, list) else [samples_per_shard] * num_shards
    if len(counts) != num_shards:
        raise ValueError("samples_per_shard list must have num_shards entries")
    classes = [f"class_{i:03d}" for i in range(num_classes)]
    manifest = Manifest(resolution=resolution or latent_size * 8, latent_channels=channels,
                        latent_size=latent_size, vae=vae, scaling_factor=scaling_factor, dtype=dtype,
                        classes=classes, name=name)
    index, means = 0, []
    for s, count in enumerate(counts):
        buf = io.BytesIO()
        keys = []
        with wds.TarWriter(buf, encoder=False, mtime=0) as writer:
            for _ in range(count):
                label, mean, std = synthetic_sample(index, channels, latent_size, num_classes, seed)
                if index in nonfinite_indices:
                    mean = np.full_like(mean, np.nan)
                else:
                    means.append(mean[0])
                source = f"synthetic/{index:08d}.png"
                writer.write(encode_sample(index, source, label, classes[label], mean, std, dtype=dtype))
                keys.append(source)
                index += 1
        storage.write_bytes(storage.join(root, shard_name(name, s)), buf.getvalue())
        storage.write_bytes(storage.join(root, shard_done_name(name, s)), json.dumps({"count": count}).encode())
        manifest.shards.append(ShardEntry(name=shard_name(name, s), count=count, keys=keys))
    if means:  # statistics of the finite samples (none: no statistics file)
        stacked = np.stack(means).astype(np.float64)
        stats = LatentStats(mean=stacked.mean(axis=(0, 2, 3)).tolist(), std=stacked.std(axis=(0, 2, 3)).tolist(),
                            count=int(stacked[:, 0].size), over="posterior mean, unflipped, unscaled")
        storage.write_bytes(storage.join(root, STATS_NAME), stats.to_json().encode())
    storage.write_bytes(storage.join(root, MANIFEST_NAME), manifest.to_json().encode())
    return manifest
