"""DiT's IDDPM diffusion: epsilon prediction, learned-range variance, hybrid MSE + VLB loss, DDPM and DDIM
sampling, optionally on a respaced subset of the training timesteps.

Timesteps `t` given to this class index its own (possibly respaced) schedule; the model is always called with
the corresponding timestep of the original training process (`timestep_map[t]`), so a model trained on 1000
steps can be sampled with 250.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .likelihood import discretized_gaussian_log_likelihood, normal_kl


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=tuple(range(1, x.ndim)))


class GaussianDiffusion:
    def __init__(self, base_betas: np.ndarray, use_timesteps: list[int] | None = None, learn_sigma: bool = True):
        """`base_betas`: the training process's betas. `use_timesteps`: the original steps to keep (all if None);
        the kept steps' alphas_cumprod are preserved and new betas derived from them."""
        base_betas = np.asarray(base_betas, dtype=np.float64)
        if base_betas.ndim != 1 or not ((base_betas > 0) & (base_betas <= 1)).all():
            raise ValueError("betas must be a 1-D array in (0, 1]")
        base_alphas_cumprod = np.cumprod(1.0 - base_betas)
        if use_timesteps is None:
            use_timesteps = range(len(base_betas))
        timestep_map = sorted(set(int(s) for s in use_timesteps))
        if not timestep_map or timestep_map[0] < 0 or timestep_map[-1] >= len(base_betas):
            raise ValueError(f"kept timesteps must lie in [0, {len(base_betas)})")
        if len(timestep_map) < 2:
            raise ValueError("a respaced diffusion needs at least 2 steps")

        alphas_cumprod = base_alphas_cumprod[timestep_map]
        betas = 1.0 - alphas_cumprod / np.append(1.0, alphas_cumprod[:-1])
        alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)

        self.learn_sigma = learn_sigma
        self.num_timesteps = len(betas)
        self.original_num_steps = len(base_betas)
        self.timestep_map = torch.tensor(timestep_map, dtype=torch.long)
        self._device_copies: dict = {}  # (id of a schedule tensor, device) -> that tensor on the device
        self._compiled: dict = {}  # method name -> its torch.compile'd form (compile_losses)
        # Schedules are float64 tensors; _gather casts them to the working dtype (float32 unless x is float64).
        arrays = dict(
            betas=betas,
            alphas_cumprod=alphas_cumprod,
            alphas_cumprod_prev=alphas_cumprod_prev,
            sqrt_alphas_cumprod=np.sqrt(alphas_cumprod),
            sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - alphas_cumprod),
            sqrt_recip_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod),
            sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod - 1.0),
            posterior_variance=posterior_variance,
            # The posterior variance is 0 at t = 0; its log is clipped to the t = 1 value.
            posterior_log_variance_clipped=np.log(np.append(posterior_variance[1], posterior_variance[1:])),
            posterior_mean_coef1=betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
            posterior_mean_coef2=(1.0 - alphas_cumprod_prev) * np.sqrt(1.0 - betas) / (1.0 - alphas_cumprod),
            log_betas=np.log(betas),
            # Variance used when the model does not learn it ("fixed large"): betas, with the better-behaved
            # posterior variance at t = 0.
            fixed_log_variance=np.log(np.append(posterior_variance[1], betas[1:])),
        )
        for name, value in arrays.items():
            setattr(self, name, torch.from_numpy(value))

    # ---------------------------------------------------------------- forward process
    def q_sample(self, x_start, t, noise=None):
        """Sample x_t ~ q(x_t | x_0) = N(sqrt(ab_t) x_0, (1 - ab_t) I)."""
        if noise is None:
            noise = torch.randn_like(x_start)
        if noise.shape != x_start.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} != x_start shape {tuple(x_start.shape)}")
        return (self._gather(self.sqrt_alphas_cumprod, t, x_start) * x_start
                + self._gather(self.sqrt_one_minus_alphas_cumprod, t, x_start) * noise)

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        mean = (self._gather(self.posterior_mean_coef1, t, x_t) * x_start
                + self._gather(self.posterior_mean_coef2, t, x_t) * x_t)
        return (mean, self._gather(self.posterior_variance, t, x_t),
                self._gather(self.posterior_log_variance_clipped, t, x_t))

    # ---------------------------------------------------------------- model -> p(x_{t-1} | x_t)
    def model_output(self, model, x_t, t, model_kwargs=None):
        """Call the model with the original-process timestep; returns its output in the working dtype."""
        out = model(x_t, self._on(self.timestep_map, t.device)[t], **(model_kwargs or {}))
        channels = x_t.shape[1] * (2 if self.learn_sigma else 1)
        if out.shape != (x_t.shape[0], channels, *x_t.shape[2:]):
            raise ValueError(f"model output shape {tuple(out.shape)}; expected "
                             f"{(x_t.shape[0], channels, *x_t.shape[2:])} (learn_sigma={self.learn_sigma})")
        return out.to(_working_dtype(x_t))

    def p_mean_variance(self, output, x_t, t, clip_denoised=False):
        """Turn a model output into p(x_{t-1} | x_t): dict(mean, variance, log_variance, pred_xstart, eps)."""
        if self.learn_sigma:
            eps, var_values = output.chunk(2, dim=1)
            # var_values in [-1, 1] interpolate (in log space) between the posterior variance and beta_t.
            frac = (var_values + 1) / 2
            log_variance = (frac * self._gather(self.log_betas, t, x_t)
                            + (1 - frac) * self._gather(self.posterior_log_variance_clipped, t, x_t))
        else:
            eps = output
            log_variance = self._gather(self.fixed_log_variance, t, x_t).expand_as(x_t)
        pred_xstart = self.predict_xstart_from_eps(x_t, t, eps)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x_t, t)
        return dict(mean=mean, variance=torch.exp(log_variance), log_variance=log_variance,
                    pred_xstart=pred_xstart, eps=eps)

    def predict_xstart_from_eps(self, x_t, t, eps):
        return (self._gather(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
                - self._gather(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps)

    def predict_eps_from_xstart(self, x_t, t, pred_xstart):
        return ((self._gather(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - pred_xstart)
                / self._gather(self.sqrt_recipm1_alphas_cumprod, t, x_t))

    # ---------------------------------------------------------------- training
    def training_losses(self, model, x_start, t, model_kwargs=None, noise=None):
        """Per-sample losses, dict(loss=[N], mse=[N], vb=[N]).

        mse: mean squared error of the predicted noise. vb (learned sigma only; zeros otherwise): the VLB term in
        bits per dimension, KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) for t > 0 and the discretised decoder NLL at
        t = 0, computed with the predicted noise detached so that it trains only the variance. loss = mse + vb.
        """
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = (self._compiled.get("q_sample") or self.q_sample)(x_start, t, noise)
        output = self.model_output(model, x_t, t, model_kwargs)
        loss, mse, vb = (self._compiled.get("loss_terms") or self.loss_terms)(output, x_start, x_t, t, noise)
        return dict(loss=loss, mse=mse, vb=vb)

    def loss_terms(self, output, x_start, x_t, t, noise):
        """(loss, mse, vb) per sample from the model's output at x_t (see training_losses)."""
        if self.learn_sigma:
            eps, var_values = output.chunk(2, dim=1)
            vb = self._vb_bits(torch.cat([eps.detach(), var_values], dim=1), x_start, x_t, t)
        else:
            eps = output
            vb = torch.zeros(x_start.shape[0], dtype=output.dtype, device=output.device)
        mse = mean_flat((noise.to(eps.dtype) - eps) ** 2)
        return mse + vb, mse, vb

    def compile_losses(self, **compile_kwargs) -> None:
        """torch.compile what training_losses does around the model call: q_sample, and the MSE and VB terms
        (forward and backward). Eager, these are ~40 small kernels each way whose launches left the GPU idle a
        few ms per step at 32 images per GPU (bench.bench_trainer_overhead --gpu-idle); compiled, a few fused
        ones. The noise stays eager (the same random numbers as without compile)."""
        self._compiled = {name: torch.compile(getattr(self, name), **compile_kwargs)
                          for name in ("q_sample", "loss_terms")}

    def _vb_bits(self, output, x_start, x_t, t):
        x_start = x_start.to(output.dtype)
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
        p = self.p_mean_variance(output, x_t, t)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, p["mean"], p["log_variance"])) / math.log(2.0)
        decoder_nll = -mean_flat(discretized_gaussian_log_likelihood(
            x_start, means=p["mean"], log_scales=0.5 * p["log_variance"])) / math.log(2.0)
        return torch.where(t == 0, decoder_nll, kl)

    # ---------------------------------------------------------------- sampling
    @torch.no_grad()
    def p_sample_loop(self, model_fn, shape, noise=None, clip_denoised=False, model_kwargs=None, device=None,
                      progress=False, generator=None):
        """Ancestral (DDPM) sampling from pure noise over this diffusion's timesteps."""
        def step(x, t, p):
            nonzero = (t != 0).to(x.dtype).view(-1, *[1] * (x.ndim - 1))  # no noise on the last step
            return p["mean"] + nonzero * torch.exp(0.5 * p["log_variance"]) * _randn(x, generator)

        return self._loop(step, model_fn, shape, noise, clip_denoised, model_kwargs, device, progress, generator)

    @torch.no_grad()
    def ddim_sample_loop(self, model_fn, shape, noise=None, clip_denoised=False, model_kwargs=None, device=None,
                         progress=False, eta=0.0, generator=None):
        """DDIM sampling (Song et al. eq. 12); eta = 0 is deterministic, eta = 1 matches DDPM's variance."""
        def step(x, t, p):
            eps = self.predict_eps_from_xstart(x, t, p["pred_xstart"])
            ab = self._gather(self.alphas_cumprod, t, x)
            ab_prev = self._gather(self.alphas_cumprod_prev, t, x)
            sigma = eta * torch.sqrt((1 - ab_prev) / (1 - ab)) * torch.sqrt(1 - ab / ab_prev)
            mean = p["pred_xstart"] * torch.sqrt(ab_prev) + torch.sqrt(1 - ab_prev - sigma ** 2) * eps
            if eta == 0:
                return mean
            nonzero = (t != 0).to(x.dtype).view(-1, *[1] * (x.ndim - 1))
            return mean + nonzero * sigma * _randn(x, generator)

        return self._loop(step, model_fn, shape, noise, clip_denoised, model_kwargs, device, progress, generator)

    def _loop(self, step, model_fn, shape, noise, clip_denoised, model_kwargs, device, progress, generator):
        shape = tuple(shape)
        if noise is not None:
            if tuple(noise.shape) != shape:
                raise ValueError(f"noise shape {tuple(noise.shape)} != requested shape {shape}")
            x = noise
        else:
            device = device if device is not None else _infer_device(model_fn)
            x = randn(shape, generator, device)
        steps = range(self.num_timesteps - 1, -1, -1)
        if progress:
            from tqdm.auto import tqdm

            steps = tqdm(steps)
        for i in steps:
            t = torch.full((shape[0],), i, dtype=torch.long, device=x.device)
            output = self.model_output(model_fn, x, t, model_kwargs)
            x = step(x, t, self.p_mean_variance(output, x, t, clip_denoised))
        return x

    # ---------------------------------------------------------------- helpers
    def _gather(self, array: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """array[t] in x's working dtype, shaped [N, 1, 1, ...] to broadcast against x."""
        values = self._on(array, t.device)[t].to(_working_dtype(x))
        return values.view(-1, *[1] * (x.ndim - 1))

    def _on(self, array: torch.Tensor, device: torch.device) -> torch.Tensor:
        """The schedule tensor on `device`, copied there once: a copy from pageable host memory per call
        synchronised the GPU 14 times per training step."""
        if array.device == device:
            return array
        key = (id(array), device)
        if key not in self._device_copies:
            self._device_copies[key] = array.to(device)
        return self._device_copies[key]


def _working_dtype(x: torch.Tensor) -> torch.dtype:
    # Never run the schedule arithmetic in half precision; float64 inputs stay float64.
    return torch.promote_types(x.dtype, torch.float32)


def _randn(x, generator):
    return randn(x.shape, generator, x.device, x.dtype)


def randn(shape, generator=None, device=None, dtype=None) -> torch.Tensor:
    """Standard normal noise of `shape`. `generator` may be one torch.Generator or a list of them, one per row
    (dimension 0): then row i comes from generator i alone, so a sample's noise does not depend on the batch it
    was drawn in (distributed sampling gives each sample index its own generator)."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for {shape[0]} rows")
        return torch.stack([torch.randn(tuple(shape[1:]), generator=g, device=device, dtype=dtype)
                            for g in generator])
    return torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)


def _infer_device(model_fn) -> torch.device:
    module = getattr(model_fn, "__self__", model_fn)  # a bound method such as model.forward_with_cfg
    parameters = getattr(module, "parameters", None)
    if parameters is not None:
        for p in parameters():
            return p.device
    return torch.device("cpu")
