"""ShardedEMA under real DeepSpeed (ZeRO-3 and ZeRO-2) with 2 processes (gloo), on parameters whose sizes do not
divide by the world size (padded partitions): the gathered EMA must equal a float64 EMA of the full fp32 weights
that DeepSpeed itself gathers (safe_get_full_fp32_param) after every step, and survive a save/load round trip.
The update lerps DeepSpeed's flat weight buffers whole; a unit test checks that on plain tensors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from servers import free_port

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORKER = textwrap.dedent("""
    import json, sys
    import deepspeed, torch
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_fp32_param
    from dig.train.ema import ShardedEMA
    from dig.train.engine import unlink_cpu_allreduce_workspace

    deepspeed.init_distributed(dist_backend="gloo")
    unlink_cpu_allreduce_workspace()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 7))  # 15, 5, 35, 7
    stage, bf16 = int(sys.argv[2]), sys.argv[3] == "bf16"
    config = {"train_batch_size": 4, "train_micro_batch_size_per_gpu": 2,
              "optimizer": {"type": "AdamW", "params": {"lr": 0.05, "torch_adam": True}},
              "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
              "bf16": {"enabled": bf16}}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    decay = 0.7
    full = lambda: {n: safe_get_full_fp32_param(p).detach().double().clone()
                    for n, p in engine.module.named_parameters()}
    reference = full()
    ema = ShardedEMA(engine.module, decay, zero_stage=stage)
    torch.manual_seed(1 + dist.get_rank())
    for step in range(4):
        x = torch.randn(2, 3).to(torch.bfloat16 if bf16 else torch.float32)
        loss = engine(x).pow(2).mean()
        engine.backward(loss)
        engine.step()
        ema.update()
        weights = full()
        reference = {n: decay * reference[n] + (1 - decay) * weights[n] for n in reference}
    gathered = ema.full_state_dict()
    err = max((gathered[n].double() - reference[n]).abs().max().item() for n in reference)
    moved = max((gathered[n].double() - weights[n]).abs().max().item() for n in reference)
    again = ShardedEMA(engine.module, decay, zero_stage=stage)
    again.load_full(gathered)
    roundtrip = all(torch.equal(a, b) for a, b in zip(again.shadow, ema.shadow))
    parts = [s.numel() for s in ema.shadow]
    if dist.get_rank() == 0:
        json.dump({"err": err, "moved": moved, "roundtrip": roundtrip, "parts": parts,
                   "shapes": {n: list(t.shape) for n, t in gathered.items()}}, open(sys.argv[1], "w"))
    dist.barrier()
    dist.destroy_process_group()
""")


# bf16: the module holds bf16 copies; the EMA must follow DeepSpeed's fp32 master weights, not those copies.
@pytest.mark.parametrize("stage,precision", [(3, "fp32"), (2, "fp32"), (2, "bf16")])
def test_sharded_ema_matches_float64_ema_of_gathered_weights(tmp_path, stage, precision):
    script, result = tmp_path / "worker.py", tmp_path / "result.json"
    script.write_text(WORKER)
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": os.path.join(REPO, ".torch_extensions"), "DS_ACCELERATOR": "cpu",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", str(script), str(result), str(stage), precision]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-5000:]
    out = json.loads(result.read_text())
    assert out["shapes"] == {"0.weight": [5, 3], "0.bias": [5], "2.weight": [7, 5], "2.bias": [7]}
    # ZeRO-3: each rank holds ceil(n / 2) of every parameter (padded); ZeRO-2: rank 0's fragments of the flat
    # master partition (62 weights padded to 64, 32 per rank: two whole parameters and 12 of the third)
    assert out["parts"] == ([8, 3, 18, 4] if stage == 3 else [15, 5, 12, 0])
    assert out["err"] < 1e-6 and out["moved"] > 1e-4 and out["roundtrip"]


def test_flat_span_update_equals_per_parameter_lerp():
    """Weights that are views into shared flat buffers (as DeepSpeed keeps them) get one flat shadow per buffer;
    the shadow views, an update and a write through a view behave exactly as per-parameter copies would."""
    import torch

    from dig.train.ema import _shadow_with_flat_spans

    g = torch.Generator().manual_seed(0)
    flat_a, flat_b = torch.randn(40, generator=g), torch.randn(30, generator=g)
    sources = [flat_a[0:15].view(3, 5), flat_a[16:21], flat_a[24:39].view(15, 1),  # gaps between views
               flat_b[2:8].view(2, 3), flat_b[10:16],
               torch.randn(4, 4, generator=g).t(),                                    # not contiguous
               torch.randn(6, generator=g).to(torch.bfloat16)]                       # alone in its buffer
    shadow, (shadows, srcs) = _shadow_with_flat_spans(sources)
    assert len(shadows) == 4  # two flat spans, two single tensors
    assert all(s.dtype == torch.float32 and torch.equal(s, src.float()) for s, src in zip(shadow, sources))
    reference = [src.double().clone() for src in sources]
    for decay in (0.9, 0.5):
        for src in sources:
            src.add_(torch.randn(src.shape, generator=g).to(src.dtype))
        torch._foreach_lerp_(shadows, [x.float() for x in srcs], 1.0 - decay)
        reference = [decay * r + (1 - decay) * src.double() for r, src in zip(reference, sources)]
    for s, r in zip(shadow, reference):
        torch.testing.assert_close(s.double(), r, rtol=1e-6, atol=1e-6)
    shadow[1].fill_(7.0)  # load_full writes through the per-parameter views
    assert shadows[0][16:21].eq(7.0).all()

