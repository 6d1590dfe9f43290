"""EMA of the trainable weights under DeepSpeed, in fp32, next to the optimizer's master weights.

Where it lives:
  * ZeRO-3: every rank keeps the EMA of *its partition* of every parameter only, in the same flat layout as
    DeepSpeed's fp32 master partition (rank r holds elements [r*P, (r+1)*P) of the flattened parameter, P the
    padded partition size). The update `ema += (1 - decay) * (w - ema)` reads the rank's local fp32 master
    partition (deepspeed.utils.safe_get_local_fp32_param) and needs no communication; EMA memory is 1/world
    of an fp32 model copy.
  * ZeRO 0-2: parameters are whole on every rank, so the EMA is a whole fp32 copy on every rank (identical).
How it is gathered: `full_state_dict()` is collective (every rank calls it); under ZeRO-3 it all-gathers the
partitions one parameter at a time and trims the padding, so peak extra memory is one parameter. Checkpoints
store the gathered EMA as one safetensors file, which makes it independent of the world size: `load_full`
slices each rank's partition back out of it.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


class ShardedEMA:
    def __init__(self, module: torch.nn.Module, decay: float, zero_stage: int):
        self.decay = decay
        self.zero3 = zero_stage == 3
        self.params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        # Looked up once: DeepSpeed's getter synchronises a stream per call, and the views stay valid because
        # DeepSpeed updates its fp32 partitions in place (optimizer step, checkpoint load).
        sources = [self._source(p) for _, p in self.params]
        self.shadow, self._pairs = _shadow_with_flat_spans(sources)

    def _source(self, p: torch.nn.Parameter) -> torch.Tensor:
        if self.zero3:
            from deepspeed.utils import safe_get_local_fp32_param

            return safe_get_local_fp32_param(p)
        return p.detach()

    @torch.no_grad()
    def update(self, decay: float | None = None) -> None:
        """`ema += (1 - decay) * (w - ema)`: one fused kernel per flat buffer of weights (a few under ZeRO)."""
        d = self.decay if decay is None else decay
        shadows, sources = self._pairs
        torch._foreach_lerp_(shadows, [s if s.dtype == torch.float32 else s.float() for s in sources], 1.0 - d)

    # --- gather / scatter ----------------------------------------------------------------------------------
    # The fp32 partitions are equally sized (padded) on every rank, as DeepSpeed's own fp32 all-gather assumes.

    @torch.no_grad()
    def full_state_dict(self, to_cpu: bool = True) -> dict[str, torch.Tensor]:
        """Whole fp32 EMA tensors by parameter name (collective under ZeRO-3; every rank gets them)."""
        out = {}
        for (name, p), local in zip(self.params, self.shadow):
            if self.zero3:
                world = dist.get_world_size()
                size = local.numel()
                buf = torch.empty(world * size, dtype=torch.float32, device=local.device)
                _all_gather(buf, local.reshape(-1).contiguous())
                full = buf.narrow(0, 0, p.ds_numel).view(p.ds_shape)
            else:
                full = local
            out[name] = full.cpu().clone() if to_cpu else full.clone()
        return out

    @torch.no_grad()
    def load_full(self, full: dict[str, torch.Tensor]) -> None:
        """Set the EMA from whole tensors (e.g. a checkpoint's ema.safetensors); each rank keeps its part."""
        missing = [n for n, _ in self.params if n not in full]
        if missing:
            raise KeyError(f"EMA state lacks parameters {missing[:5]}{'…' if len(missing) > 5 else ''}")
        for (name, p), local in zip(self.params, self.shadow):
            t = full[name].to(device=local.device, dtype=torch.float32)
            if self.zero3:
                if tuple(t.shape) != tuple(p.ds_shape):
                    raise ValueError(f"EMA {name}: shape {tuple(t.shape)}, the model has {tuple(p.ds_shape)}")
                size, rank = local.numel(), dist.get_rank()
                flat = t.reshape(-1)
                part = flat[rank * size:(rank + 1) * size]
                local.zero_()
                local.reshape(-1)[:part.numel()].copy_(part)
            else:
                local.copy_(t)


def _all_gather(out: torch.Tensor, local: torch.Tensor) -> None:
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, local)


def _shadow_with_flat_spans(sources: list[torch.Tensor]):
    """fp32 copies of `sources` and the (shadow, source) tensor pairs an update lerps. DeepSpeed keeps the weights
    as views into a few flat buffers; where sources are contiguous views sharing a buffer (and cover most of the
    span between the first and the last), the shadow is one flat tensor too and the pair is the whole span,
    padding included, so an update is a handful of big kernels instead of one per parameter."""
    shadow: list[torch.Tensor | None] = [None] * len(sources)
    pair_shadows, pair_sources = [], []
    by_storage: dict[tuple, list[int]] = {}
    for i, src in enumerate(sources):
        if src.is_contiguous() and src.numel():
            key = (src.untyped_storage().data_ptr(), src.dtype, src.device)
            by_storage.setdefault(key, []).append(i)
    for members in by_storage.values():
        lo = min(sources[i].storage_offset() for i in members)
        hi = max(sources[i].storage_offset() + sources[i].numel() for i in members)
        if len(members) < 2 or hi - lo > 2 * sum(sources[i].numel() for i in members):
            continue
        span = sources[members[0]].as_strided((hi - lo,), (1,), lo)
        flat = span.detach().clone().float()
        for i in members:
            start = sources[i].storage_offset() - lo
            shadow[i] = flat[start:start + sources[i].numel()].view(sources[i].shape)
        pair_shadows.append(flat)
        pair_sources.append(span)
    for i, src in enumerate(sources):
        if shadow[i] is None:
            shadow[i] = src.detach().clone().float()
            pair_shadows.append(shadow[i])
            pair_sources.append(src)
    return shadow, (pair_shadows, pair_sources)

