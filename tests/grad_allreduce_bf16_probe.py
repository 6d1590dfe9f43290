"""Run by tests/test_grad_allreduce.py under torchrun with 2 CPU processes (gloo):

    python -m torch.distributed.run --nproc_per_node=2 tests/grad_allreduce_bf16_probe.py OUT [cpu|cuda]

OverlappedGradAllReduce with comm_dtype=bfloat16 on a bias-only model whose gradient is known in closed form:
loss = sum(bias_i * x_rank_i), so rank r's gradient is x_r (fp32 values chosen so that bf16 rounding changes them).
Two micro-batches per step: the fp32 bucket must hold x_r + x_r' before it is cast. Rank 0 saves the reduced
gradients and the inputs. With `cuda`, each rank uses its GPU and NCCL."""
from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from dig.train.grad_allreduce import OverlappedGradAllReduce


def main(out: str, device: str) -> None:
    dist.init_process_group("nccl" if device == "cuda" else "gloo")
    rank = dist.get_rank()
    if device == "cuda":
        torch.cuda.set_device(rank)
    params = [torch.nn.Parameter(torch.zeros(n, device=device)) for n in (7, 300, 5)]
    micro = []
    for m in range(2):
        gen = torch.Generator().manual_seed(100 * rank + m)
        micro.append([(torch.randn(p.numel(), generator=gen) * 3 + 1e-3).to(device) for p in params])
    state = {"boundary": False}
    reducer = OverlappedGradAllReduce(params, lambda: state["boundary"], bucket_mb=1200 / 2 ** 20,
                                      comm_dtype=torch.bfloat16)
    assert len(reducer.buckets) >= 2
    for m, xs in enumerate(micro):
        state["boundary"] = m == len(micro) - 1
        sum((p * x).sum() for p, x in zip(params, xs)).backward()
    reducer.finish()
    assert all(b.comm is not None and b.comm.dtype == torch.bfloat16 for b in reducer.buckets)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, [[x.cpu() for x in xs] for xs in micro])
    if rank == 0:
        torch.save({"grads": [p.grad.cpu() for p in params], "inputs": gathered,
                    "dtypes": [p.grad.dtype for p in params]}, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "cpu")
