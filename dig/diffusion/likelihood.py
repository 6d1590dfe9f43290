"""Gaussian KL and the discretised Gaussian log-likelihood used by the variational bound (in nats)."""
from __future__ import annotations

import math

import torch


def normal_kl(mean1, logvar1, mean2, logvar2):
    """Elementwise KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))); arguments broadcast."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x):
    # The tanh approximation of the normal CDF that IDDPM/DiT use; kept so the VLB matches theirs.
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """log P(x) per element, for x on the 256-level grid of [-1, 1] (bins of width 2/255; the end bins
    extend to ±infinity), under N(means, exp(log_scales)^2)."""
    if not x.shape == means.shape == log_scales.shape:
        raise ValueError(f"shape mismatch: x {tuple(x.shape)}, means {tuple(means.shape)}, "
                         f"log_scales {tuple(log_scales.shape)}")
    centred = x - means
    inv_std = torch.exp(-log_scales)
    cdf_upper = approx_standard_normal_cdf(inv_std * (centred + 1.0 / 255.0))
    cdf_lower = approx_standard_normal_cdf(inv_std * (centred - 1.0 / 255.0))
    log_cdf_upper = torch.log(cdf_upper.clamp(min=1e-12))
    log_one_minus_cdf_lower = torch.log((1.0 - cdf_lower).clamp(min=1e-12))
    log_bin = torch.log((cdf_upper - cdf_lower).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_upper, torch.where(x > 0.999, log_one_minus_cdf_lower, log_bin))
