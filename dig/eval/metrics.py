"""The ADM suite's metrics on Inception features (guided-diffusion's evaluations/evaluator.py defines them):

  FID / sFID   Fréchet distance between Gaussians fitted to pool / spatial features (mean, covariance with N-1)
  IS           exp(E_x KL(p(y|x) || p(y))) per split of 5000 consecutive samples, averaged over the splits;
               p(y|x) = softmax of the bias-free logits
  precision    fraction of samples inside the reference manifold; recall: fraction of references inside the
               sample manifold. A manifold is the union of balls around each of its points whose radius is the
               distance to that point's k-th nearest neighbour in the same set (k = 3, the point itself not counted)

Numerics: float64 for the statistics and the Fréchet distance; pairwise distances in float32 blocks (ADM tries
float16 first and falls back to float32).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class GaussianStats:
    mu: np.ndarray      # [D]
    sigma: np.ndarray   # [D, D]

    @classmethod
    def of(cls, features: np.ndarray) -> "GaussianStats":
        f = np.asarray(features, dtype=np.float64)
        if f.ndim != 2 or len(f) < 2:
            raise ValueError(f"need at least 2 feature vectors [N, D], got shape {f.shape}")
        return cls(f.mean(axis=0), np.cov(f, rowvar=False))


def frechet_distance(a: GaussianStats, b: GaussianStats) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^1/2). The trace of the matrix square root is taken as the sum
    of the square roots of the eigenvalues of S_a^1/2 S_b S_a^1/2 (symmetric PSD, same eigenvalues as S_a S_b),
    which stays real and stable for singular covariances (few samples, high dimensions)."""
    mu_a, mu_b = np.atleast_1d(a.mu).astype(np.float64), np.atleast_1d(b.mu).astype(np.float64)
    s_a, s_b = np.atleast_2d(a.sigma).astype(np.float64), np.atleast_2d(b.sigma).astype(np.float64)
    if mu_a.shape != mu_b.shape or s_a.shape != s_b.shape:
        raise ValueError(f"feature sizes differ: {mu_a.shape} vs {mu_b.shape}")
    root_a = _psd_sqrt(s_a)
    inner = root_a @ s_b @ root_a
    eig = np.linalg.eigvalsh((inner + inner.T) / 2)
    tr_covmean = np.sqrt(np.clip(eig, 0, None)).sum()
    diff = mu_a - mu_b
    return float(diff @ diff + np.trace(s_a) + np.trace(s_b) - 2 * tr_covmean)


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def inception_score(logits: np.ndarray, split_size: int = 5000) -> float:
    """ADM's IS: consecutive splits of `split_size` (the last may be shorter), mean of the per-split scores."""
    logits = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    log_p = torch.log_softmax(logits, dim=1)
    scores = []
    for start in range(0, len(log_p), split_size):
        part = log_p[start:start + split_size]
        log_marginal = torch.logsumexp(part, dim=0) - np.log(len(part))
        kl = (part.exp() * (part - log_marginal)).sum(dim=1).mean()
        scores.append(float(torch.exp(kl)))
    return float(np.mean(scores))


def _sq_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances [len(a), len(b)], as ||a||^2 - 2 a.b + ||b||^2 clamped at 0."""
    return (a.square().sum(1, keepdim=True) - 2 * a @ b.T + b.square().sum(1)[None]).clamp_min_(0)


def manifold_radii(features: torch.Tensor, k: int = 3, block: int = 10000) -> torch.Tensor:
    """Squared distance of each point to its k-th nearest neighbour in the set (the point itself is 0th)."""
    if len(features) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} feature vectors, got {len(features)}")
    out = []
    for start in range(0, len(features), block):
        d = _sq_distances(features[start:start + block], features)
        out.append(d.kthvalue(k + 1, dim=1).values)
    return torch.cat(out)


def precision_recall(ref: np.ndarray, samples: np.ndarray, k: int = 3, block: int = 10000,
                     device: str | torch.device = "cpu") -> tuple[float, float]:
    """(precision, recall) of `samples` against `ref` (pool features), ADM's k-NN manifold definition."""
    r = torch.as_tensor(np.asarray(ref), dtype=torch.float32, device=device)
    s = torch.as_tensor(np.asarray(samples), dtype=torch.float32, device=device)
    radii_r, radii_s = manifold_radii(r, k, block), manifold_radii(s, k, block)
    sample_in_ref = torch.zeros(len(s), dtype=torch.bool, device=device)
    ref_in_sample = torch.zeros(len(r), dtype=torch.bool, device=device)
    for i in range(0, len(r), block):
        for j in range(0, len(s), block):
            d = _sq_distances(r[i:i + block], s[j:j + block])
            sample_in_ref[j:j + block] |= (d <= radii_r[i:i + block, None]).any(dim=0)
            ref_in_sample[i:i + block] |= (d <= radii_s[None, j:j + block]).any(dim=1)
    return float(sample_in_ref.double().mean()), float(ref_in_sample.double().mean())
