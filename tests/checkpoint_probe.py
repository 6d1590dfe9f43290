"""Run by tests/test_train_async_checkpoint.py in a fresh process (one process group per process):

A one-process Trainer (CPU, ZeRO stage from argv) trains 2 steps (after the first it has rehearsed a save and
created the host buffers the save copies into, writing nothing); DeepSpeed's own writer saves the engine state
(the reference); the trainer's background save of the same step starts, and 3 more steps train while it is being
written (mutating weights, optimizer moments, lr); the files it wrote must hold exactly the reference's values,
the per-rank state the step-2 data position, and the EMA the step-2 EMA; and every file and folder of the checkpoint
was fsynced before `latest` named it.

    python tests/checkpoint_probe.py STAGE WORKDIR
"""
from __future__ import annotations

import os
import re
import sys
import threading

import torch


def assert_same(a, b, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
        assert a.requires_grad == b.requires_grad, where
    elif isinstance(a, dict):
        assert set(a) == set(b), (where, set(a) ^ set(b))
        for k in a:
            if k == "ds_config":
                continue  # DeepSpeed's config object: compared by identity otherwise
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif hasattr(a, "__dict__") and not isinstance(a, type):  # e.g. DeepSpeed's loss scaler: by attributes
        assert type(a) is type(b), where
        assert_same(vars(a), vars(b), where)
    else:
        assert a == b or (a != a and b != b), (where, a, b)


def main(stage: int, workdir: str) -> None:
    from dig.data.synthetic import write_synthetic_dataset
    from dig.train import checkpoint
    from dig.train import trainer as trainer_module
    from dig.train.config import resolve, validate
    from dig.train.engine import free_loopback_port, shutdown
    from dig.train.tracking import NullTracker

    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(free_loopback_port()))
    data = os.path.join(workdir, "latents")
    write_synthetic_dataset(data, num_shards=2, samples_per_shard=8)
    base = {"run": {"dir": os.path.join(workdir, "run"), "seed": 3},
            "model": {"name": "DiG-S/2", "num_classes": 10, "overrides": {"depth": 2, "hidden_size": 64,
                                                                          "num_heads": 2}},
            "data": {"path": data, "resolution": 64, "global_batch_size": 4, "micro_batch_size": 4},
            "optim": {"lr": 1e-3, "warmup_steps": 4}, "engine": {"zero_stage": stage, "precision": "fp32"},
            "steps": 10, "ema_decay": 0.5, "checkpoint": {"every": 0},
            "tracking": {"log_every": 0, "sample_every": 0}}
    resolved = resolve(base=base)
    trainer_module.make_tracker = lambda *a, **k: NullTracker()
    tr = trainer_module.Trainer(validate(resolved), resolved)
    for _ in range(2):
        tr.run_step()
    # the first step rehearsed a save and created its host buffers in the background, writing nothing
    tr.checkpoints._allocating.join()
    prepared = [b.data_ptr() for b in tr.checkpoints._stager.buffers]
    assert prepared, "no buffers prepared after the first step"
    folder = os.path.join(tr.run_dir, "checkpoints")
    assert not os.path.exists(folder) or not os.listdir(folder), os.listdir(folder)
    reference = os.path.join(workdir, "reference")
    tr.engine.save_checkpoint(reference, tag="engine", client_state={"step": tr.step}, save_latest=False)
    ema_then = tr.ema.full_state_dict()
    data_then = tr.data.state_dict()
    # every fsync, by path: every file and folder of the checkpoint must be synced before `latest` is
    synced, real_fsync = [], os.fsync

    def recording_fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    os.fsync = recording_fsync
    # hold the background writer at its first file until training has moved on, so the write surely overlaps
    gate, write_durable = threading.Event(), checkpoint.write_durable
    checkpoint.write_durable = lambda path, write: (gate.wait(), write_durable(path, write))[1]
    tr.save_checkpoint()
    assert tr.checkpoints.background
    # the save copied into exactly the prepared buffers: the rehearsal saw the tensors the save sees
    assert [b.data_ptr() for b in tr.checkpoints._stager.buffers] == prepared
    for _ in range(3):
        tr.run_step()
    assert tr.checkpoints.in_flight()
    gate.set()
    saved = tr.checkpoints.wait()
    assert saved is not None and saved.step == 2, saved
    ckpt = checkpoint.latest_checkpoint(tr.run_dir)
    assert ckpt.endswith("step_000000002"), ckpt
    os.fsync = real_fsync
    final = [os.path.join(os.path.dirname(p), re.sub(r"^\.tmp-\d+-", "", os.path.basename(p))) for p in synced]
    latest_at = final.index(os.path.join(os.path.dirname(ckpt), "latest"))
    before = set(final[:latest_at])
    must = [ckpt, os.path.join(ckpt, "engine"), os.path.dirname(ckpt)]
    must += [os.path.join(d, f) for d, _, files in os.walk(ckpt) for f in files]
    assert len(must) >= 7 and not [p for p in must if p not in before], [p for p in must if p not in before]
    assert os.path.dirname(ckpt) in final[latest_at + 1:]  # the rename of `latest` itself is synced
    ours = os.path.join(ckpt, "engine")
    theirs = os.path.join(reference, "engine")
    names = sorted(os.listdir(theirs))
    assert sorted(os.listdir(ours)) == names, (os.listdir(ours), names)
    for name in names:
        if name.endswith(".pt"):
            a = torch.load(os.path.join(theirs, name), map_location="cpu", weights_only=False)
            b = torch.load(os.path.join(ours, name), map_location="cpu", weights_only=False)
            assert_same(a, b, name)
    ema = checkpoint.load_ema_full(ckpt)
    assert set(ema) == set(ema_then) and all(torch.equal(ema[k], ema_then[k]) for k in ema)
    state = checkpoint.load_rank_state(ckpt, 0, 1)
    assert state["step"] == 2 and state["data"] == data_then
    moved = tr.ema.full_state_dict()
    assert any(not torch.equal(moved[k], ema_then[k]) for k in moved)  # training did go on meanwhile
    tr.data.close()
    tr.run_lock.release()
    shutdown()
    print("PROBE OK", len(names), "engine files")


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
