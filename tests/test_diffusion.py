"""dig.diffusion against closed forms and independent float64 computations."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dig.diffusion import create_diffusion, sample, space_timesteps
from dig.diffusion.likelihood import discretized_gaussian_log_likelihood, normal_kl

F64 = torch.float64


def reference_alphas_cumprod(steps: int = 1000) -> np.ndarray:
    """Ho et al.'s linear schedule, 1e-4 … 0.02 at 1000 steps, written out independently of dig."""
    scale = 1000 / steps
    return np.cumprod(1.0 - np.linspace(1e-4 * scale, 0.02 * scale, steps))


def test_linear_schedule_is_dits():
    d = create_diffusion()
    assert d.num_timesteps == 1000
    assert d.betas[0].item() == pytest.approx(1e-4) and d.betas[-1].item() == pytest.approx(0.02)
    np.testing.assert_allclose(d.alphas_cumprod.numpy(), reference_alphas_cumprod(), rtol=1e-12)
    # Other step counts describe the same process: 500 steps of twice the beta.
    d500 = create_diffusion(diffusion_steps=500)
    assert d500.betas[0].item() == pytest.approx(2e-4) and d500.betas[-1].item() == pytest.approx(0.04)


@pytest.mark.parametrize("t", [0, 300, 999])
def test_q_sample_moments(t):
    d = create_diffusion()
    x0 = torch.tensor([1.5, -0.7, 0.0, 3.0], dtype=F64)
    n = 200_000
    g = torch.Generator().manual_seed(t)
    noise = torch.randn(n, 4, generator=g, dtype=F64)
    xt = d.q_sample(x0.expand(n, 4), torch.full((n,), t), noise=noise)
    ab = reference_alphas_cumprod()[t]
    mean_tol = 5 * math.sqrt((1 - ab) / n)
    np.testing.assert_allclose(xt.mean(0).numpy(), math.sqrt(ab) * x0.numpy(), atol=mean_tol)
    np.testing.assert_allclose(xt.var(0).numpy(), np.full(4, 1 - ab), rtol=5 * math.sqrt(2 / n))


def test_posterior_matches_bayes_rule():
    """q(x_{t-1} | x_t, x_0) from Gaussian conditioning: prior N(sqrt(ab_{t-1}) x0, 1 - ab_{t-1}) on x_{t-1},
    likelihood N(sqrt(a_t) x_{t-1}, beta_t) of x_t; precision-weighted combination."""
    d = create_diffusion()
    ab = reference_alphas_cumprod()
    t = torch.tensor([1, 2, 10, 500, 999])
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(5, 3, 2, 2, generator=g, dtype=F64)
    xt = torch.randn(5, 3, 2, 2, generator=g, dtype=F64)
    mean, var, log_var = d.q_posterior_mean_variance(x0, xt, t)
    for i, ti in enumerate(t.tolist()):
        ab_prev, alpha = ab[ti - 1], ab[ti] / ab[ti - 1]
        beta = 1 - alpha
        precision = 1 / (1 - ab_prev) + alpha / beta
        ref_var = 1 / precision
        ref_mean = ref_var * (math.sqrt(ab_prev) * x0[i] / (1 - ab_prev) + math.sqrt(alpha) * xt[i] / beta)
        torch.testing.assert_close(mean[i], ref_mean, rtol=1e-9, atol=1e-9)
        assert var[i].item() == pytest.approx(ref_var, rel=1e-9)
        assert log_var[i].item() == pytest.approx(math.log(ref_var), rel=1e-9)
    # At t = 0 the posterior is a point mass at x0 (variance 0; log-variance clipped to the t = 1 value).
    m0, v0, lv0 = d.q_posterior_mean_variance(x0, xt, torch.zeros(5, dtype=torch.long))
    torch.testing.assert_close(m0, x0)
    assert v0.abs().max().item() == 0.0
    assert lv0[0].item() == pytest.approx(log_var[0].item())


@pytest.mark.parametrize("spacing", ["250", "ddim50", "10,20", "7"])
def test_respaced_schedule_keeps_alphas_cumprod(spacing):
    d = create_diffusion(spacing)
    kept = d.timestep_map.numpy()
    ab = reference_alphas_cumprod()
    np.testing.assert_allclose(d.alphas_cumprod.numpy(), ab[kept], rtol=1e-12)
    np.testing.assert_allclose(np.cumprod(1 - d.betas.numpy()), ab[kept], rtol=1e-12)
    assert kept[0] == 0


def test_space_timesteps_closed_forms():
    assert space_timesteps(1000, "") == list(range(1000))
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    assert space_timesteps(1000, "10") == list(range(0, 1000, 111))  # stride (1000-1)/(10-1) = 111 exactly
    steps = space_timesteps(1000, "250")
    assert len(steps) == 250 and steps[0] == 0 and steps[-1] == 999
    assert set(np.diff(steps)) <= {4, 5}
    # Two sections of 500: 10 steps spanning [0, 499], then 20 spanning [500, 999].
    sections = space_timesteps(1000, "10,20")
    assert len(sections) == 30
    assert sections[:10][0] == 0 and sections[9] == 499 and sections[10] == 500 and sections[-1] == 999
    for bad in ["abc", "ddim999", "0", "2000", "600,600", "ddimx"]:
        with pytest.raises(ValueError):
            space_timesteps(1000, bad)
    with pytest.raises(ValueError):
        create_diffusion(noise_schedule="quadratic")


def test_model_sees_original_timesteps():
    d = create_diffusion("10")
    seen = []

    def model(x, t, y):
        seen.append(t.clone())
        return torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:])

    d.ddim_sample_loop(model, (2, 1, 2, 2), model_kwargs=dict(y=torch.zeros(2, dtype=torch.long)))
    assert [s[0].item() for s in seen] == list(range(999, -1, -111))
    d.training_losses(model, torch.zeros(2, 1, 2, 2), torch.tensor([3, 9]), model_kwargs=dict(y=None))
    assert seen[-1].tolist() == [333, 999]


def test_normal_kl():
    m = torch.randn(10, dtype=F64)
    lv = torch.randn(10, dtype=F64)
    assert normal_kl(m, lv, m, lv).abs().max().item() < 1e-15
    m2, lv2 = torch.randn(10, dtype=F64), torch.randn(10, dtype=F64)
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(m, torch.exp(0.5 * lv)),
                                            torch.distributions.Normal(m2, torch.exp(0.5 * lv2)))
    torch.testing.assert_close(normal_kl(m, lv, m2, lv2), ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mean,log_scale", [(0.0, math.log(0.3)), (0.83, math.log(0.01)), (-0.99, 0.0)])
def test_discretized_likelihood_is_a_distribution_over_256_bins(mean, log_scale):
    x = torch.linspace(-1, 1, 256, dtype=F64)
    assert torch.allclose(x * 127.5 + 127.5, torch.arange(256, dtype=F64))
    log_p = discretized_gaussian_log_likelihood(x, means=torch.full_like(x, mean),
                                                log_scales=torch.full_like(x, log_scale))
    assert log_p.exp().sum().item() == pytest.approx(1.0, abs=1e-6)
    # Interior bins agree with the exact normal CDF to the tanh approximation's accuracy.
    normal = torch.distributions.Normal(mean, math.exp(log_scale))
    exact = normal.cdf(x[1:-1] + 1 / 255) - normal.cdf(x[1:-1] - 1 / 255)
    assert (log_p.exp()[1:-1] - exact).abs().max().item() < 1e-3


def oracle_model(noise, var_values):
    """A model that outputs the true noise and fixed variance values."""
    def model(x, t, **kwargs):
        return torch.cat([noise, var_values], dim=1)
    return model


def diffusion_for(path: str):
    """The training loss eager, or compiled as `dig train` runs it with model.compile (compile_losses)."""
    d = create_diffusion()
    if path == "compiled":
        torch._dynamo.reset()
        d.compile_losses()
    return d


@pytest.mark.parametrize("path", ["eager", "compiled"])
def test_training_losses_with_true_noise(path):
    d = diffusion_for(path)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randint(0, 256, (4, 3, 4, 4), generator=g).to(F64) / 127.5 - 1  # the 256-level grid
    x0[0, 0, 0, :2] = torch.tensor([-1.0, 1.0])  # make sure both open-ended end bins occur
    noise = torch.randn(4, 3, 4, 4, generator=g, dtype=F64)
    v = torch.rand(4, 3, 4, 4, generator=g, dtype=F64) * 2 - 1
    t = torch.tensor([0, 1, 400, 999])
    out = d.training_losses(oracle_model(noise, v), x0, t, noise=noise)
    assert out["mse"].abs().max().item() < 1e-20
    torch.testing.assert_close(out["loss"], out["mse"] + out["vb"])

    # Exact noise => predicted mean = true posterior mean, so the KL is the variance part alone (in bits).
    ab = reference_alphas_cumprod()
    betas = 1 - ab / np.append(1.0, ab[:-1])
    post_var = betas * (1 - np.append(1.0, ab[:-1])) / (1 - ab)
    for i, ti in enumerate(t.tolist()[1:], start=1):
        log_true = math.log(post_var[ti])
        frac = (v[i] + 1) / 2
        log_model = frac * math.log(betas[ti]) + (1 - frac) * log_true
        kl = 0.5 * (-1 + log_model - log_true + torch.exp(log_true - log_model))
        assert out["vb"][i].item() == pytest.approx(kl.mean().item() / math.log(2), rel=1e-9)

    # t = 0: decoder NLL of x0 under N(x0, model variance), bins of width 2/255, the end bins open-ended
    # (exact CDF; the code's tanh approximation sets the tolerance).
    frac = (v[0] + 1) / 2
    std = torch.exp(0.5 * (frac * math.log(betas[0]) + (1 - frac) * math.log(post_var[1])))
    normal = torch.distributions.Normal(x0[0], std)
    upper = torch.where(x0[0] > 0.999, torch.full_like(x0[0], math.inf), x0[0] + 1 / 255)
    lower = torch.where(x0[0] < -0.999, torch.full_like(x0[0], -math.inf), x0[0] - 1 / 255)
    p = normal.cdf(upper) - normal.cdf(lower)
    assert out["vb"][0].item() == pytest.approx(-torch.log(p).mean().item() / math.log(2), rel=2e-3)


@pytest.mark.parametrize("path", ["eager", "compiled"])
def test_vlb_trains_only_the_variance(path):
    d = diffusion_for(path)
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(3, 2, 4, 4, generator=g, dtype=F64)
    noise = torch.randn(3, 2, 4, 4, generator=g, dtype=F64)
    raw = torch.randn(3, 4, 4, 4, generator=g, dtype=F64).requires_grad_()
    out = d.training_losses(lambda x, t: raw, x0, torch.tensor([0, 10, 700]), noise=noise)
    (grad_vb,) = torch.autograd.grad(out["vb"].sum(), raw, retain_graph=True)
    assert grad_vb[:, :2].abs().max().item() == 0.0  # eps channels: stopped
    assert (grad_vb[:, 2:].abs().flatten(1).sum(1) > 0).all()  # variance channels of every sample: trained
    (grad_mse,) = torch.autograd.grad(out["mse"].sum(), raw)
    assert grad_mse[:, 2:].abs().max().item() == 0.0
    torch.testing.assert_close(grad_mse[:, :2], 2 * (raw[:, :2].detach() - noise) / 32)  # d mean((e - n)^2)/de


def test_learned_range_endpoints():
    d = create_diffusion("50")
    x = torch.zeros(3, 1, 2, 2, dtype=F64)
    t = torch.tensor([0, 7, 49])
    for v, ref in [(1.0, d.betas.log()), (-1.0, d.posterior_log_variance_clipped)]:
        out = torch.cat([torch.zeros_like(x), torch.full_like(x, v)], 1)
        p = d.p_mean_variance(out, x, t)
        torch.testing.assert_close(p["log_variance"][:, 0, 0, 0], ref[t])


def x0_oracle(x0, alphas_cumprod):
    """The ideal denoiser for data that is exactly x0: eps recovered from x_t and the true x0."""
    ab = torch.as_tensor(alphas_cumprod, dtype=F64)

    def model(x, t, **kwargs):
        a = ab[t].view(-1, 1, 1, 1)
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        return torch.cat([eps, torch.zeros_like(eps)], dim=1)
    return model


@pytest.mark.parametrize("spacing", ["", "ddim50", "13"])
def test_ddim_eta0_deterministic_and_recovers_x0(spacing):
    d = create_diffusion(spacing)
    x0 = torch.randn(2, 3, 4, 4, dtype=F64, generator=torch.Generator().manual_seed(3))
    model = x0_oracle(x0, reference_alphas_cumprod())  # indexed by *original* timesteps
    noise = torch.randn(2, 3, 4, 4, dtype=F64, generator=torch.Generator().manual_seed(4))
    a = d.ddim_sample_loop(model, noise.shape, noise=noise, generator=torch.Generator().manual_seed(5))
    b = d.ddim_sample_loop(model, noise.shape, noise=noise, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b)
    torch.testing.assert_close(a, x0, rtol=1e-8, atol=1e-8)
    # DDPM's last step is the posterior mean at t = 0, which is x0 itself when the model knows x0.
    c = d.p_sample_loop(model, noise.shape, noise=noise, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(c, x0, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("spacing,var_value,n", [("", -1.0, 2_000), ("100", -1.0, 20_000), ("100", 1.0, 20_000)])
def test_ddpm_sampler_reproduces_gaussian_data(spacing, var_value, n):
    """Data N(0, s^2): the exact noise predictor is E[eps | x_t] = sqrt(1-ab) x_t / (ab s^2 + 1 - ab). Every
    ancestral step is then linear, x_{t-1} = c_t x_t + sigma_t z, so the sample variance follows the recurrence
    V_{t-1} = c_t^2 V_t + sigma_t^2 from V = 1, computed here in float64 from the kept alphas_cumprod."""
    s2 = 0.25
    d = create_diffusion(spacing)
    ab_all = torch.as_tensor(reference_alphas_cumprod(), dtype=F64)

    def model(x, t):
        a = ab_all[t].view(-1, 1, 1, 1)
        eps = (1 - a).sqrt() * x / (a * s2 + 1 - a)
        return torch.cat([eps, torch.full_like(eps, var_value)], 1)

    out = d.p_sample_loop(model, (n, 1, 1, 1), device="cpu", generator=torch.Generator().manual_seed(8),
                          noise=torch.randn(n, 1, 1, 1, dtype=F64, generator=torch.Generator().manual_seed(9)))
    ab = reference_alphas_cumprod()[d.timestep_map.numpy()]
    var = 1.0
    for i in reversed(range(len(ab))):
        a, a_prev = ab[i], (ab[i - 1] if i > 0 else 1.0)
        beta = 1 - a / a_prev
        shrink = math.sqrt(1 - a) / (a * s2 + 1 - a)  # eps = shrink * x_t
        to_x0 = (1 - math.sqrt(1 - a) * shrink) / math.sqrt(a)  # pred_x0 = to_x0 * x_t
        c = beta * math.sqrt(a_prev) / (1 - a) * to_x0 + (1 - a_prev) * math.sqrt(1 - beta) / (1 - a)
        post_var = beta * (1 - a_prev) / (1 - a)
        step_var = 0.0 if i == 0 else (beta if var_value > 0 else post_var)  # no noise on the last step
        var = c * c * var + step_var
    assert abs(out.mean().item()) < 5 * math.sqrt(var / n)
    assert out.var().item() == pytest.approx(var, rel=5 * math.sqrt(2 / n))
    if spacing == "":
        assert var == pytest.approx(s2, rel=0.03)  # 1000 exact-score steps land near the data distribution


class StubDiT(torch.nn.Module):
    """DiT's sampling interface around a fixed analytic function of (x, t, y); null class = num_classes."""
    num_classes, in_channels, learn_sigma = 3, 2, True

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(10)
        self.shift = torch.nn.Parameter(torch.randn(self.num_classes + 1, self.in_channels, generator=g))

    def forward(self, x, t, y):
        tt = t.float().view(-1, 1, 1, 1) / 1000
        eps = 0.3 * x * torch.cos(tt) + self.shift[y][:, :, None, None]
        return torch.cat([eps, torch.tanh(x + tt)], dim=1)

    def forward_with_cfg(self, x, t, y, cfg_scale):
        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half]), t, y)
        eps, rest = out[:, : self.in_channels], out[:, self.in_channels:]
        cond, uncond = eps.chunk(2)
        guided = uncond + cfg_scale * (cond - uncond)
        return torch.cat([torch.cat([guided, guided]), rest], dim=1)


@pytest.mark.parametrize("cfg_scale", [1.0, 4.0])
def test_sample_ddim_with_cfg_matches_manual_loop(cfg_scale):
    model = StubDiT()
    labels = torch.tensor([0, 2, 1])
    got = sample(model, labels, (2, 3, 3), num_steps=10, cfg_scale=cfg_scale, method="ddim",
                 generator=torch.Generator().manual_seed(11))
    assert got.shape == (3, 2, 3, 3)

    # Independent DDIM loop over the 10 kept steps (0, 111, …, 999), guidance by the textbook formula.
    ab = reference_alphas_cumprod()
    kept = list(range(0, 1000, 111))
    x = torch.randn(3, 2, 3, 3, generator=torch.Generator().manual_seed(11))
    null = torch.full_like(labels, 3)
    with torch.no_grad():
        for i in reversed(range(10)):
            t = torch.full((3,), kept[i])
            cond, uncond = model(x, t, labels)[:, :2], model(x, t, null)[:, :2]
            eps = uncond + cfg_scale * (cond - uncond)
            a, a_prev = ab[kept[i]], (ab[kept[i - 1]] if i > 0 else 1.0)
            pred_x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
            x = math.sqrt(a_prev) * pred_x0 + math.sqrt(1 - a_prev) * eps
    torch.testing.assert_close(got, x, rtol=1e-4, atol=1e-4)


def test_sample_ddpm_reproducible_and_validated():
    model = StubDiT().train()
    kwargs = dict(num_steps=5, cfg_scale=1.5, method="ddpm")
    a = sample(model, [1, 2], (2, 2, 2), generator=torch.Generator().manual_seed(12), **kwargs)
    b = sample(model, [1, 2], (2, 2, 2), generator=torch.Generator().manual_seed(12), **kwargs)
    assert torch.equal(a, b) and a.shape == (2, 2, 2, 2) and torch.isfinite(a).all()
    assert model.training  # mode restored
    with pytest.raises(ValueError):
        sample(model, [3], (2, 2, 2))  # 3 is the null class, not a label
    with pytest.raises(ValueError):
        sample(model, [0], (4, 2, 2))
    with pytest.raises(ValueError):
        sample(model, [0], (2, 2, 2), method="euler")


@pytest.mark.parametrize("learn_sigma", [True, False])
def test_compiled_loss_parts_are_single_graphs(learn_sigma):
    """compile_losses only pays if dynamo keeps q_sample and the loss terms whole (a graph break would leave the
    small kernels it is meant to fuse)."""
    d = create_diffusion(learn_sigma=learn_sigma)
    g = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    t = torch.tensor([0, 10, 700])
    output = torch.randn(3, 4 if learn_sigma else 2, 4, 4, generator=g)
    for fn, args in ((d.q_sample, (x0, t, noise)), (d.loss_terms, (output, x0, d.q_sample(x0, t, noise), t, noise))):
        torch._dynamo.reset()
        explained = torch._dynamo.explain(fn)(*args)
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
