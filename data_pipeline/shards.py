"""The per-shard stages around the encoder: read + decode a shard's inputs, and write the finished shard.

A shard is complete exactly when its `{name}-NNNNNN.done.json` exists. The tar is uploaded first (atomically:
local rename or a completed S3 multipart upload), the done record after it, so a shard can never look complete
before it is; a shard without a done record is redone from scratch by the next run.

The done record (pipeline-internal, read back by `finalize`) holds what the manifest, the latent statistics and
the rejects file need, so a resumed run can rebuild them without re-reading any tar:
  {"shard": name, "index": i, "count": n, "keys": [source, ...], "sample_keys": [...],
   "rejects": [{"index", "source", "reason"}], "stats": {"count": values per channel, "sum": [C], "sumsq": [C]}}
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from dig.data import shard_format, storage

from .images import RejectedImage, load_image
from .listing import InputItem, ShardSpec

# Fault injection for the kill/resume test: seconds to wait between a shard's tar upload and its done record
# (the window in which a killed job leaves a tar that must not count as complete).
PAUSE_BEFORE_DONE_ENV = "DIG_PIPELINE_PAUSE_BEFORE_DONE"


def _read_item(item: InputItem) -> bytes:
    if item.offset >= 0:
        return storage.read_range(item.uri, item.offset, item.size)
    return storage.read_bytes(item.uri)


def decode_shard(row: dict, resolution: int, min_side: int, io_threads: int) -> dict:
    """Ray Data `map` stage: a shard spec row -> its cropped images (uint8 [n, H, W, 3]) and its rejects."""
    spec = ShardSpec.from_row(row)

    def load(item: InputItem):
        # Only the content can make a reject. A failed read (after boto3's retries) fails the shard instead:
        # a re-run redoes it, where a reject would have dropped a good image for good.
        data = _read_item(item)
        try:
            return load_image(data, resolution, min_side), None
        except RejectedImage as exc:
            return None, str(exc)

    with ThreadPoolExecutor(max_workers=min(io_threads, max(1, len(spec.items)))) as pool:
        results = list(pool.map(load, spec.items))
    kept, images, rejects = [], [], []
    for pos, (item, (image, reason)) in enumerate(zip(spec.items, results)):
        if image is None:
            rejects.append({"index": spec.indices[pos], "source": item.source, "reason": reason})
        else:
            kept.append(pos)
            images.append(image)
    return {
        **row,
        "kept": json.dumps(kept),
        "rejects": json.dumps(rejects),
        "images": np.stack(images) if images else np.zeros((0, resolution, resolution, 3), np.uint8),
    }


def write_shard(row: dict, output: str, name: str, storage_dtype: str) -> dict:
    """Ray Data `map` stage: encoded shard row -> tar + done record on `output`; returns the done record."""
    import webdataset as wds

    spec = ShardSpec.from_row(row)
    kept = json.loads(row["kept"])
    mean, std = np.asarray(row["mean"]), np.asarray(row["std"])
    if len(mean) != len(kept):
        raise RuntimeError(f"shard {spec.index}: {len(mean)} encodings for {len(kept)} images")
    tar_name = shard_format.shard_name(name, spec.index)
    keys, sample_keys = [], []
    fd, local = tempfile.mkstemp(prefix=f"dig-{name}-", suffix=".tar")
    os.close(fd)
    try:
        with wds.TarWriter(local) as sink:
            for j, pos in enumerate(kept):
                item = spec.items[pos]
                sample = shard_format.encode_sample(spec.indices[pos], item.source, item.label, item.class_name,
                                                    mean[j], std[j], dtype=storage_dtype)
                sink.write(sample)
                keys.append(item.source)
                sample_keys.append(sample["__key__"])
        storage.upload_file(local, storage.join(output, tar_name))
    finally:
        os.unlink(local)

    means = mean.astype(np.float64) if len(kept) else np.zeros((0, 2, 1, 1, 1))
    channels = means.shape[2]
    record = {
        "shard": tar_name,
        "index": spec.index,
        "count": len(kept),
        "keys": keys,
        "sample_keys": sample_keys,
        "rejects": json.loads(row["rejects"]),
        "stats": {
            "count": int(means.size // channels) if len(kept) else 0,
            "sum": means.sum(axis=(0, 1, 3, 4)).tolist() if len(kept) else [],
            "sumsq": np.square(means).sum(axis=(0, 1, 3, 4)).tolist() if len(kept) else [],
        },
    }
    pause = float(os.environ.get(PAUSE_BEFORE_DONE_ENV, "0") or 0)
    if pause > 0:
        time.sleep(pause)
    storage.write_bytes(storage.join(output, shard_format.shard_done_name(name, spec.index)),
                        json.dumps(record).encode())
    return {"shard": spec.index, "record": json.dumps(record)}
