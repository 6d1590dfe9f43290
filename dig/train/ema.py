"""EMA of the trainable weights under DeepSpeed, in fp32, next to the optimizer's master weights.

Where it lives: every rank keeps the EMA of the part of DeepSpeed's fp32 master weights that this rank updates,
read in place (no communication; EMA memory is that of the rank's master partition):
  * ZeRO-3: its partition of every parameter, in DeepSpeed's flat layout (rank r holds elements [r*P, (r+1)*P)
    of the flattened parameter, P the padded partition size; deepspeed.utils.safe_get_local_fp32_param).
  * ZeRO-1/2, and bf16 without ZeRO: its fragment of the flat fp32 master partition (a parameter may be whole,
    cut, or absent on a rank; DeepSpeed's `_hp_mapping`). The module's own weights are bf16 copies then.
  * fp32 without ZeRO: the module's weights are the master weights; a whole copy on every rank.
The master weights sit in a few flat buffers, so an update is one fused lerp per buffer.
How it is gathered: `full_state_dict()` is collective (every rank calls it): partitions are all-gathered and the
padding trimmed, fragments summed into zeros, one parameter at a time, so peak extra memory is one parameter.
Checkpoints store the gathered EMA as one safetensors file, which makes it independent of the world size:
`load_full` cuts each rank's part back out of it.
With a CUDA `stream`, an update runs there, after the work queued so far (the optimizer step), beside the next
step's forward; whoever next writes the weights (the optimizer: `wait_for_update`) or reads the EMA (gather, load)
waits for it on the device, not on the host.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


class ShardedEMA:
    def __init__(self, module: torch.nn.Module, decay: float, zero_stage: int,
                 stream: torch.cuda.Stream | None = None):
        self.decay = decay
        self.stream = stream
        self._updated: torch.cuda.Event | None = None
        self.zero3 = zero_stage == 3
        self.params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        self.fragments = not self.zero3 and any(hasattr(p, "_hp_mapping") for _, p in self.params)
        # Looked up once: DeepSpeed's getter synchronises a stream per call, and the views stay valid because
        # DeepSpeed updates its fp32 master weights in place (optimizer step, checkpoint load).
        sources = [self._source(p) for _, p in self.params]
        self.shadow, self._pairs = _shadow_with_flat_spans(sources)

    def _source(self, p: torch.nn.Parameter) -> torch.Tensor:
        if self.zero3:
            from deepspeed.utils import safe_get_local_fp32_param

            return safe_get_local_fp32_param(p)
        if self.fragments:
            mapping = p._hp_mapping
            return mapping.hp_fragment if mapping is not None else torch.empty(0, device=p.device)
        return p.detach()

    @staticmethod
    def _fragment_start(p: torch.nn.Parameter) -> int:
        """Where this rank's fragment starts in the flattened parameter."""
        return p._hp_mapping.lp_fragment_address.start if p._hp_mapping is not None else 0

    @torch.no_grad()
    def update(self, decay: float | None = None) -> None:
        """`ema += (1 - decay) * (w - ema)`: one fused kernel per flat buffer of weights (a few under ZeRO)."""
        d = self.decay if decay is None else decay
        shadows, sources = self._pairs
        if self.stream is not None:
            weights_ready = torch.cuda.Event()
            weights_ready.record()
            self.stream.wait_event(weights_ready)
        with torch.cuda.stream(self.stream):  # None: the current stream
            torch._foreach_lerp_(shadows, [s if s.dtype == torch.float32 else s.float() for s in sources], 1.0 - d)
        if self.stream is not None:
            self._updated = torch.cuda.Event()
            self._updated.record(self.stream)

    def wait_for_update(self) -> None:
        """The current stream waits (on the device) for the last update: before the weights it reads change, or
        before the EMA itself is read or replaced."""
        if self._updated is not None:
            torch.cuda.current_stream().wait_event(self._updated)

    # --- gather / scatter ----------------------------------------------------------------------------------
    # ZeRO-3 partitions are equally sized (padded) on every rank, as DeepSpeed's own fp32 all-gather assumes.

    @torch.no_grad()
    def full_state_dict(self, to_cpu: bool = True) -> dict[str, torch.Tensor]:
        """Whole fp32 EMA tensors by parameter name (collective under ZeRO; every rank gets them)."""
        return {name: full.cpu().clone() if to_cpu else full.clone() for name, full in self.gather_each()}

    @torch.no_grad()
    def gather_each(self):
        """(name, whole fp32 EMA tensor on the device), one parameter at a time (collective under ZeRO: every rank
        iterates to the end). A yielded tensor may be a temporary buffer or the EMA itself: copy it before the
        next one and do not modify it."""
        self.wait_for_update()
        for (name, p), local in zip(self.params, self.shadow):
            if self.zero3:
                world = dist.get_world_size()
                size = local.numel()
                buf = torch.empty(world * size, dtype=torch.float32, device=local.device)
                _all_gather(buf, local.reshape(-1).contiguous())
                full = buf.narrow(0, 0, p.ds_numel).view(p.ds_shape)
            elif self.fragments:
                full = torch.zeros(p.numel(), dtype=torch.float32, device=local.device)
                start = self._fragment_start(p)
                full[start:start + local.numel()] = local.reshape(-1)
                if dist.is_initialized() and dist.get_world_size(p._dp_group) > 1:
                    dist.all_reduce(full, group=p._dp_group)
                full = full.view(p.shape)
            else:
                full = local
            yield name, full

    @torch.no_grad()
    def load_full(self, full: dict[str, torch.Tensor]) -> None:
        """Set the EMA from whole tensors (e.g. a checkpoint's ema.safetensors); each rank keeps its part."""
        self.wait_for_update()
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
            elif self.fragments:
                if tuple(t.shape) != tuple(p.shape):
                    raise ValueError(f"EMA {name}: shape {tuple(t.shape)}, the model has {tuple(p.shape)}")
                start = self._fragment_start(p)
                local.reshape(-1).copy_(t.reshape(-1)[start:start + local.numel()])
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

