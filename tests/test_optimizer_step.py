"""CachedFusedAdamW against torch's own fused AdamW (its CPU kernel): the same bits, and torch's step wherever
the shortcut does not apply."""
from __future__ import annotations

import copy
import warnings

import torch

from dig.train.optimizer_step import CachedFusedAdamW


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(*shape)) for shape in ((7, 5), (5,), (3, 4, 2), (1,))]
    opt = torch.optim.AdamW(params, lr=3e-3, betas=(0.8, 0.95), eps=1e-7, weight_decay=0.1, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / 3))  # as DeepSpeed gets it
    return params, opt, sched


def _state(opt) -> list[torch.Tensor]:
    return [t for s in opt.state.values() for t in (s["exp_avg"], s["exp_avg_sq"], s["step"])]


def test_same_bits_as_torch_fused_adamw_and_torch_where_it_does_not_apply():
    ref_params, ref_opt, ref_sched = _setup()
    params, opt, sched = _setup()
    cached = CachedFusedAdamW.install(opt)
    assert cached is not None
    torch_steps = []
    torch_step = cached.torch_step
    cached.torch_step = lambda *a: torch_steps.append(len(torch_steps)) or torch_step(*a)
    gen = torch.Generator().manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. the LR scheduler's "lr_scheduler.step() before optimizer.step()"
        for i in range(8):
            grads = [torch.randn(p.shape, generator=gen) for p in params]
            for ps in (ref_params, params):
                for p, g in zip(ps, grads):
                    p.grad = g.clone()
            if i == 3:  # a parameter without a gradient this step: torch skips it
                ref_params[2].grad = params[2].grad = None
            if i == 5:  # a checkpoint load replaces the state and the param groups
                opt.load_state_dict(copy.deepcopy(ref_opt.state_dict()))
            ref_opt.step()
            opt.step()
            ref_sched.step()
            sched.step()
            for a, b in zip(ref_params + _state(ref_opt), params + _state(opt)):
                assert torch.equal(a, b), f"step {i}"
    assert torch_steps == [0, 1]  # the first step (it makes the state) and the one without a gradient


def test_not_installed_where_it_does_not_fit():
    p = [torch.nn.Parameter(torch.randn(3))]
    assert CachedFusedAdamW.install(torch.optim.AdamW(p, fused=False)) is None
    assert CachedFusedAdamW.install(torch.optim.Adam(p, fused=True)) is None
    two_groups = torch.optim.AdamW([{"params": p}, {"params": [torch.nn.Parameter(torch.randn(2))]}], fused=True)
    assert CachedFusedAdamW.install(two_groups) is None


def test_a_step_hook_gets_torchs_step():
    params, opt, _ = _setup()
    cached = CachedFusedAdamW.install(opt)
    calls = []
    opt.register_step_post_hook(lambda *_: calls.append(1))
    for _ in range(3):
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
    assert calls == [1, 1, 1] and cached._lists is None
