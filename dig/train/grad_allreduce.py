"""Gradient all-reduce overlapped with the backward, for data parallel training without ZeRO (stage 0).

DeepSpeed's stage 0 reduces after the backward has finished: it flattens every gradient into a buffer, all-reduces
it and copies the result back, so the whole exchange (2.7 GB of fp32 gradients for DiG-XL/2) waits on the last
gradient. Here gradients go into fixed buckets as they become ready (a hook after each parameter's accumulation),
and a bucket is all-reduced asynchronously as soon as all of its gradients are in, while the backward goes on;
`finish` waits for the last ones before the optimizer step. Each parameter's .grad is then a view into its bucket,
so nothing is copied back. The buckets exist only from a step's first gradient to the end of its optimizer step
(`release`): between steps, as with one rank, no gradient memory is held while the forward builds its
activations (persistent buckets cost DiG-XL/2 2.5 GiB of peak on 2-4 H200s). Buckets follow the reverse
parameter order (about the order the backward produces them) and are launched strictly in that order on every
rank, as NCCL needs one collective order everywhere. The arithmetic is DeepSpeed's: the sum over ranks, then
times 1 / world size.

With `comm_dtype` (e.g. bf16, `engine.grad_allreduce_dtype`) a bucket is cast into a buffer of that dtype just
before it is sent and the sum is read back into the fp32 bucket: half the bytes on the wire and half the time NCCL's
kernels share the SMs with the backward, at bf16 rounding of each rank's gradient and of the sum (as DeepSpeed's
`communication_data_type` and torch DDP's bf16 compression hook do). Gradients still accumulate in fp32.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist


@dataclass
class _Bucket:
    params: list[torch.nn.Parameter]
    numel: int
    dtype: torch.dtype
    device: torch.device
    buffer: torch.Tensor | None = None  # allocated at the step's first gradient, dropped by `release`
    views: dict[int, torch.Tensor] = field(default_factory=dict)  # id(param) -> its slice of the buffer
    ready: set[int] = field(default_factory=set)  # id(param) of the gradients already in, this step
    handle: object = None  # the async all-reduce, once launched
    comm: torch.Tensor | None = None  # the buffer sent instead of `buffer` when the exchange uses another dtype

    def full(self) -> bool:
        return len(self.ready) == len(self.params)


class OverlappedGradAllReduce:
    """Hooks on `params`; `is_boundary()` says whether this backward ends a gradient-accumulation cycle (only then
    are gradients exchanged). Call `finish()` after the backward and before reading gradients."""

    def __init__(self, params, is_boundary: Callable[[], bool], bucket_mb: float = 100.0, group=None,
                 comm_dtype: torch.dtype | None = None):
        self.group = group
        self.comm_dtype = comm_dtype
        self.world_size = dist.get_world_size(group)
        self.is_boundary = is_boundary
        self.buckets: list[_Bucket] = []
        self._bucket_of: dict[int, _Bucket] = {}
        self._next_launch = 0
        params = [p for p in params if p.requires_grad]
        for members in _group_in_buckets(list(reversed(params)), int(bucket_mb * 2 ** 20)):
            bucket = _Bucket(members, sum(p.numel() for p in members), members[0].dtype, members[0].device)
            for p in members:
                self._bucket_of[id(p)] = bucket
            self.buckets.append(bucket)
        for p in params:
            p.register_post_accumulate_grad_hook(self._grad_ready)

    def _grad_ready(self, p: torch.nn.Parameter) -> None:
        bucket = self._bucket_of[id(p)]
        if not self.is_boundary():
            # accumulating: the gradient moves into its bucket now and autograd adds the next micro-batches there in
            # place; left where autograd put it, every gradient would exist twice until the cycle's last backward
            self._place(p, bucket)
            return
        if id(p) in bucket.ready:
            raise RuntimeError("a parameter's gradient was accumulated twice in one backward, after its bucket may "
                               "have been sent; set engine.overlap_grad_allreduce=false for this model")
        self._into_bucket(p, bucket)
        self._launch_ready()

    @staticmethod
    def _allocate(bucket: _Bucket) -> None:
        # uninitialised: every slice is written (a gradient copied in, or zeros) before the bucket is sent
        bucket.buffer = torch.empty(bucket.numel, dtype=bucket.dtype, device=bucket.device)
        offset = 0
        for p in bucket.params:
            bucket.views[id(p)] = bucket.buffer[offset:offset + p.numel()].view_as(p)
            offset += p.numel()

    def release(self) -> None:
        """After the optimizer step (DeepSpeed has set every .grad to None): drop the buckets, so their memory
        serves the next forward; the next step's first gradients allocate them again."""
        for bucket in self.buckets:
            bucket.buffer, bucket.comm, bucket.views = None, None, {}

    @classmethod
    def _place(cls, p: torch.nn.Parameter, bucket: _Bucket) -> None:
        if bucket.buffer is None:
            cls._allocate(bucket)
        view = bucket.views[id(p)]
        if p.grad is None:
            view.zero_()
        elif p.grad.data_ptr() != view.data_ptr():
            view.copy_(p.grad)
        p.grad = view

    def _into_bucket(self, p: torch.nn.Parameter, bucket: _Bucket) -> None:
        self._place(p, bucket)
        bucket.ready.add(id(p))

    def _launch_ready(self) -> None:
        while self._next_launch < len(self.buckets) and self.buckets[self._next_launch].full():
            bucket = self.buckets[self._next_launch]
            if self.comm_dtype is not None and self.comm_dtype != bucket.dtype:
                bucket.comm = bucket.buffer.to(self.comm_dtype)
            sent = bucket.buffer if bucket.comm is None else bucket.comm
            bucket.handle = dist.all_reduce(sent, group=self.group, async_op=True)
            self._next_launch += 1

    def finish(self) -> None:
        """Wait for every bucket's exchange (launching any whose gradients never came: they count as zero), then
        average. Afterwards every parameter's .grad is the mean over ranks."""
        for bucket in self.buckets[self._next_launch:]:
            for p in bucket.params:
                if id(p) not in bucket.ready:
                    self._into_bucket(p, bucket)
        self._launch_ready()
        for bucket in self.buckets:
            bucket.handle.wait()
            bucket.handle = None
            bucket.ready.clear()
            if bucket.comm is not None:
                bucket.buffer.copy_(bucket.comm)
        self._next_launch = 0
        torch._foreach_mul_([b.buffer for b in self.buckets], 1.0 / self.world_size)

def _group_in_buckets(params: list[torch.nn.Parameter], bucket_bytes: int) -> list[list[torch.nn.Parameter]]:
    """Consecutive parameters of one dtype and device, about bucket_bytes per group (a larger parameter alone)."""
    groups: list[list[torch.nn.Parameter]] = []
    size = 0
    for p in params:
        same_kind = groups and (groups[-1][0].dtype, groups[-1][0].device) == (p.dtype, p.device)
        if same_kind and size + p.numel() * p.element_size() <= bucket_bytes:
            groups[-1].append(p)
            size += p.numel() * p.element_size()
        else:
            groups.append([p])
            size = p.numel() * p.element_size()
    return groups
