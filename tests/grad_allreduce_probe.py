"""Run by tests/test_grad_allreduce.py under torchrun with 2 CPU processes (gloo):

    python -m torch.distributed.run --nproc_per_node=2 tests/grad_allreduce_probe.py DATA WORKDIR OVERLAP OUT [KEY=VALUE...]

A Trainer with ZeRO stage 0 and fp32 weights (two micro-batches per rank per step, gradient clipping on) trains 3
steps with engine.overlap_grad_allreduce=OVERLAP and tiny buckets; rank 0 saves the weights, the logged gradient
norms, how often DeepSpeed's own gradient all-reduce ran and, with the overlap, how many buckets were already
sent when the backward had finished and how many gradient elements lived outside the buckets after each
micro-batch's backward, and how many bucket elements stayed allocated after each optimizer step, and how many
micro-batches were skipped as non-finite. With one process there is nothing to reduce. KEY=VALUE arguments override
the training config (e.g. the batch sizes)."""
from __future__ import annotations

import os
import sys

import torch


def main(data: str, workdir: str, overlap: bool, out: str, overrides: list[str]) -> None:
    from dig.train import trainer as trainer_module
    from dig.train.config import resolve, validate
    from dig.train.engine import shutdown
    from dig.train.tracking import NullTracker

    base = {"run": {"dir": os.path.join(workdir, "run"), "seed": 3},
            "model": {"name": "DiG-S/2", "num_classes": 10, "overrides": {"depth": 2, "hidden_size": 64,
                                                                          "num_heads": 2}},
            "data": {"path": data, "resolution": 64, "global_batch_size": 8, "micro_batch_size": 2},
            "optim": {"lr": 1e-3, "warmup_steps": 2, "grad_clip": 0.05},
            "engine": {"zero_stage": 0, "precision": "fp32", "overlap_grad_allreduce": overlap,
                       "grad_bucket_mb": 0.02},
            "steps": 3, "ema_decay": 0.5, "checkpoint": {"every": 0},
            "tracking": {"log_every": 0, "sample_every": 0}}
    resolved = resolve(base=base, overrides=overrides)
    trainer_module.make_tracker = lambda *a, **k: NullTracker()
    tr = trainer_module.Trainer(validate(resolved), resolved)
    reducer = getattr(tr.engine, "dig_grad_reducer", None)
    assert (reducer is not None) == (overlap and tr.rt.world_size > 1), reducer
    deepspeed_reduces = []
    fallback = tr.engine.buffered_allreduce_fallback
    tr.engine.buffered_allreduce_fallback = lambda *a, **k: (deepspeed_reduces.append(1), fallback(*a, **k))[1]
    sent_before_finish, outside_buckets = [], []
    if reducer is not None:
        finish = reducer.finish
        reducer.finish = lambda: (sent_before_finish.append((reducer._next_launch, len(reducer.buckets))), finish())
        backward = tr.engine.backward

        def backward_then_count(*args, **kwargs):
            out = backward(*args, **kwargs)   # after each micro-batch: gradient elements held outside the buckets
            bucket_storage = {b.buffer.untyped_storage().data_ptr() for b in reducer.buckets if b.buffer is not None}
            outside_buckets.append(sum(p.grad.numel() for p in tr.engine.module.parameters() if p.grad is not None
                                       and p.grad.untyped_storage().data_ptr() not in bucket_storage))
            return out
        tr.engine.backward = backward_then_count
    norms, held_between_steps = [], []
    for _ in range(3):
        tr.run_step()
        norms.append(float(tr.engine.get_global_grad_norm()))
        if reducer is not None:  # bucket elements still allocated after the optimizer step
            held_between_steps.append(sum(b.numel for b in reducer.buckets if b.buffer is not None))
    if tr.rt.rank == 0:
        torch.save({"weights": {k: v.detach().clone() for k, v in tr.engine.module.state_dict().items()},
                    "grad_norms": norms, "held_between_steps": held_between_steps, "sent_before_finish": sent_before_finish, "outside_buckets": outside_buckets,
                    "deepspeed_reduces": len(deepspeed_reduces), "nonfinite_skipped": tr.nonfinite_total,
                    "backward_first": tr._backward_first}, out)
    tr.data.close()
    if tr.run_lock is not None:
        tr.run_lock.release()
    shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3] == "true", sys.argv[4], sys.argv[5:])
