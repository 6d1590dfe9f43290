"""`dig eval --samples A.npz --ref B.npz`: Inception features of two image sets in the ADM `.npz` layout
(`arr_0`: uint8 [N, H, W, 3]) and the ADM suite's numbers between them (dig.eval.metrics).

The reference batch may carry precomputed statistics (`mu`, `sigma`, `mu_s`, `sigma_s`, as the ADM reference
batches do); like the ADM evaluator they are used for FID/sFID when present (`use_ref_stats=False` recomputes
them from `arr_0` with this network). Precision/recall always use the reference images' features.
"""
from __future__ import annotations

import logging
import os
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

from .metrics import GaussianStats, frechet_distance, inception_score, precision_recall

log = logging.getLogger(__name__)

METRICS = ("inception_score", "fid", "sfid", "precision", "recall")
LABELS = {"inception_score": "Inception Score", "fid": "FID", "sfid": "sFID", "precision": "Precision",
          "recall": "Recall"}


class NpzError(ValueError):
    """An .npz that is not an ADM image batch."""


@contextmanager
def open_image_batch(path: str):
    """(count, iterator factory over uint8 [B, H, W, 3] batches) of `arr_0`, read from the zip without loading
    the whole array (a 50k sample set is ~10 GB)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise NpzError(f"{path} is not an .npz file") from None
    with zf:
        if "arr_0.npy" not in zf.namelist():
            raise NpzError(f"{path} has no arr_0 (entries: {zf.namelist()[:8]}); expected the ADM layout, "
                           "arr_0 = uint8 [N, H, W, 3]")
        with zf.open("arr_0.npy") as f:
            shape, fortran, dtype = _read_header(f)
        if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3 or fortran:
            raise NpzError(f"{path}: arr_0 is {dtype} {shape}{' (Fortran order)' if fortran else ''}; expected "
                           "uint8 [N, H, W, 3] in C order")

        def batches(batch_size: int) -> Iterator[np.ndarray]:
            with zf.open("arr_0.npy") as f:
                _read_header(f)
                per_image = int(np.prod(shape[1:]))
                for start in range(0, shape[0], batch_size):
                    n = min(batch_size, shape[0] - start)
                    data = bytearray(n * per_image)  # writable, so torch can take the batch without a warning
                    if f.readinto(data) != len(data):
                        raise NpzError(f"{path}: arr_0 ends after {start} of {shape[0]} images (truncated file)")
                    yield np.frombuffer(data, np.uint8).reshape(n, *shape[1:])

        yield shape[0], batches


def _read_header(f) -> tuple[tuple, bool, np.dtype]:
    version = np.lib.format.read_magic(f)
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    if version not in readers:
        raise NpzError(f"unsupported .npy format version {version} for arr_0")
    return readers[version](f)


@torch.no_grad()
def image_features(inception, images: np.ndarray | torch.Tensor, device) -> dict[str, np.ndarray]:
    """uint8 NHWC images → dict(pool, spatial, logits) as float32 numpy arrays."""
    x = torch.as_tensor(np.asarray(images)).to(device).permute(0, 3, 1, 2).float()
    return {k: v.float().cpu().numpy() for k, v in inception(x).items()}


def npz_features(path: str, inception, device, batch_size: int = 100, progress: bool = True,
                 desc: str = "") -> dict[str, np.ndarray]:
    from dig.inference.progress import Progress

    parts: dict[str, list[np.ndarray]] = {"pool": [], "spatial": [], "logits": []}
    with open_image_batch(path) as (count, batches):
        bar = Progress(count, desc or f"Inception features of {os.path.basename(path)}", enabled=progress)
        for batch in batches(batch_size):
            for k, v in image_features(inception, batch, device).items():
                parts[k].append(v)
            bar.update(len(batch))
        bar.close()
    return {k: np.concatenate(v) for k, v in parts.items()}


def stored_stats(path: str) -> tuple[GaussianStats, GaussianStats] | None:
    """The (pool, spatial) statistics an ADM reference batch carries, if any."""
    with np.load(path) as z:
        if {"mu", "sigma", "mu_s", "sigma_s"} <= set(z.files):
            return GaussianStats(z["mu"], z["sigma"]), GaussianStats(z["mu_s"], z["sigma_s"])
    return None


def compute_metrics(sample_feats: dict[str, np.ndarray], ref_feats: dict[str, np.ndarray],
                    ref_stats: tuple[GaussianStats, GaussianStats] | None = None,
                    device: str | torch.device = "cpu") -> dict[str, float]:
    pool_ref, spatial_ref = ref_stats or (GaussianStats.of(ref_feats["pool"]), GaussianStats.of(ref_feats["spatial"]))
    precision, recall = precision_recall(ref_feats["pool"], sample_feats["pool"], device=device)
    return {
        "inception_score": inception_score(sample_feats["logits"]),
        "fid": frechet_distance(GaussianStats.of(sample_feats["pool"]), pool_ref),
        "sfid": frechet_distance(GaussianStats.of(sample_feats["spatial"]), spatial_ref),
        "precision": precision,
        "recall": recall,
    }


def evaluate(samples: str, ref: str, inception_weights: str | None, device: str | torch.device | None = None,
             batch_size: int = 100, use_ref_stats: bool = True, progress: bool = True) -> dict[str, float]:
    from .inception import load_inception

    for path in (samples, ref):  # both readable before any long work
        with open_image_batch(path) as (count, _):
            if count < 4:
                raise NpzError(f"{path}: {count} images; precision/recall need at least 4")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    inception = load_inception(inception_weights, device)
    ref_feats = npz_features(ref, inception, device, batch_size, progress, "reference features")
    sample_feats = npz_features(samples, inception, device, batch_size, progress, "sample features")
    ref_stats = stored_stats(ref) if use_ref_stats else None
    if ref_stats is not None:
        log.info("FID/sFID against the statistics stored in %s (mu, sigma, mu_s, sigma_s)", ref)
    return compute_metrics(sample_feats, ref_feats, ref_stats, device)


def format_table(metrics: dict[str, float]) -> str:
    width = max(len(LABELS[k]) for k in METRICS)
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  ----------"]
    lines += [f"{LABELS[k]:<{width}}  {metrics[k]:.4f}" for k in METRICS if k in metrics]
    return "\n".join(lines)


def log_to_mlflow(metrics: dict[str, float], run_id: str, tracking_uri: str | None = None,
                  step: int | None = None, prefix: str = "eval/") -> None:
    """Add the numbers to an existing MLflow run (a training run: its id is in <run dir>/tracking.json)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    client.get_run(run_id)  # a clear MLflow error for an unknown run, before anything is logged
    for k, v in metrics.items():
        client.log_metric(run_id, prefix + k, float(v), step=step or 0)
