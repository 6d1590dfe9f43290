"""torch.optim.AdamW(fused=True)'s step without its per-step Python: the same fused kernel on the same state.

At 32 images per GPU the host sets the pace of a DiG-XL/2 step, and AdamW's step spent ~3 ms of it rebuilding
the same five lists of ~580 tensors (`_init_group`) and grouping them by device (`_group_tensors_by_device_and_
dtype`) before one fused kernel. `CachedFusedAdamW` builds the lists once, after torch's own first step made the
state, and then calls `torch._foreach_add_` on the step counters and `torch._fused_adamw_` with them exactly as
torch's fused path does, so parameters and state are bit-for-bit the same. It hands the step back to torch
whenever its shortcut would not be what torch does: a parameter without a gradient, a state or param groups
replaced (`load_state_dict`), optimizer hooks, or any option the shortcut does not cover.
"""
from __future__ import annotations

import functools

import torch
from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks


class CachedFusedAdamW:
    def __init__(self, optimizer: torch.optim.AdamW):
        self.optimizer = optimizer
        self.torch_step = optimizer.step
        self._lists = None  # (params, exp_avgs, exp_avg_sqs, state_steps)
        self._for = (None, None)  # the state and param group the lists were built from

    @classmethod
    def install(cls, optimizer) -> CachedFusedAdamW | None:
        """Replace `optimizer.step` by the cached one when the optimizer is a fused torch AdamW with one param
        group; returns None (nothing changed) otherwise."""
        if type(optimizer) is not torch.optim.AdamW or len(optimizer.param_groups) != 1 \
                or not optimizer.param_groups[0].get("fused"):
            return None
        cached = cls(optimizer)

        # keeps the attributes torch's LR scheduler put on the step it wrapped (it checks them on its first step)
        @functools.wraps(cached.torch_step)
        def step(closure=None):
            return cached.step(closure)

        optimizer.step = step
        return cached

    def step(self, closure=None):
        if closure is not None or not self._usable():
            self._lists = None
            return self.torch_step(closure)
        state, group = self.optimizer.state, self.optimizer.param_groups[0]
        if self._lists is None or self._for[0] is not state or self._for[1] is not group:
            if not self._build():
                return self.torch_step()
        params, exp_avgs, exp_avg_sqs, steps = self._lists
        grads = [p.grad for p in params]
        if any(g is None for g in grads):
            return self.torch_step()
        beta1, beta2 = group["betas"]
        with torch.no_grad():
            torch._foreach_add_(steps, 1)
            torch._fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, [], steps, amsgrad=False, lr=group["lr"],
                                beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"], eps=group["eps"],
                                maximize=False, grad_scale=None, found_inf=None)
        return None

    def _usable(self) -> bool:
        opt = self.optimizer
        if len(opt.param_groups) != 1 or opt._optimizer_step_pre_hooks or opt._optimizer_step_post_hooks \
                or _global_optimizer_pre_hooks or _global_optimizer_post_hooks:
            return False
        g = opt.param_groups[0]
        return (g.get("fused") and not g["amsgrad"] and not g["maximize"] and not g["differentiable"]
                and not g["capturable"] and not isinstance(g["lr"], torch.Tensor)
                and not any(isinstance(b, torch.Tensor) for b in g["betas"]))

    def _build(self) -> bool:
        """The lists, from a state torch's own step made; False while that state does not exist yet."""
        opt, group = self.optimizer, self.optimizer.param_groups[0]
        params = list(group["params"])
        states = [opt.state.get(p) for p in params]
        if not params or any(not s or "exp_avg" not in s for s in states):
            return False
        device, dtype = params[0].device, params[0].dtype
        tensors = [t for p, s in zip(params, states) for t in (p, s["exp_avg"], s["exp_avg_sq"])]
        if any(t.device != device or t.dtype != dtype or t.is_complex() for t in tensors) \
                or any(s["step"].device != device for s in states):
            return False
        self._lists = (params, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
                       [s["step"] for s in states])
        self._for = (opt.state, group)
        return True
