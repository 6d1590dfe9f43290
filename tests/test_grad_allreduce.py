"""The gradient all-reduce overlapped with the backward (dig/train/grad_allreduce.py) against DeepSpeed's own
reduce-after-backward: 2 CPU ranks (gloo), ZeRO stage 0, fp32, two micro-batches per step, clipping on; the
weights after 3 steps and every step's gradient norm must be bitwise the same, buckets must have been sent while
the backward was still running, the gradients must be accumulated in the buckets themselves, and the buckets must
be freed between steps."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from dig.data.synthetic import write_synthetic_dataset
from dig.train.engine import free_loopback_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train(data: str, tmp_path, overlap: bool, ranks: int = 2, extra_env: dict | None = None,
           overrides: tuple[str, ...] = (), name: str = "") -> dict:
    work = tmp_path / f"overlap_{overlap}_{ranks}{name}"
    work.mkdir()
    out = work / "result.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", "--master_addr=127.0.0.1",
           f"--master_port={free_loopback_port()}", os.path.join(REPO, "tests", "grad_allreduce_probe.py"), data,
           str(work), str(overlap).lower(), str(out), *overrides]
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=os.path.join(REPO, ".torch_extensions"), OMP_NUM_THREADS="1",
               **(extra_env or {}))
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return torch.load(out, weights_only=False)


def test_overlapped_allreduce_equals_deepspeeds_reduce_after_backward(tmp_path):
    data = str(tmp_path / "latents")
    write_synthetic_dataset(data, num_shards=4, samples_per_shard=8)
    ours, deepspeeds = _train(data, tmp_path, True), _train(data, tmp_path, False)
    assert ours["grad_norms"] == deepspeeds["grad_norms"] and all(n > 0 for n in ours["grad_norms"])
    assert set(ours["weights"]) == set(deepspeeds["weights"])
    differing = [k for k in ours["weights"] if not torch.equal(ours["weights"][k], deepspeeds["weights"][k])]
    assert not differing, differing
    assert deepspeeds["sent_before_finish"] == [] and deepspeeds["deepspeed_reduces"] == 3  # once per step
    assert ours["deepspeed_reduces"] == 0
    assert len(ours["sent_before_finish"]) == 3  # one exchange per optimizer step, not per micro-batch
    for sent, buckets in ours["sent_before_finish"]:
        assert buckets > 10 and sent >= buckets // 2, (sent, buckets)  # most buckets left during the backward
    # every micro-batch's gradients are accumulated in the buckets: no second copy of them while accumulating
    assert ours["outside_buckets"] == [0] * 6, ours["outside_buckets"]
    # the buckets live from a step's first gradient to its optimizer step, not across steps
    assert ours["held_between_steps"] == [0] * 3, ours["held_between_steps"]


def test_skipped_micro_batch_leaves_no_trace_when_its_backward_ran_first(tmp_path):
    """engine.backward_before_loss_check (one micro-batch per step, no ZeRO, fp32): the backward is queued before
    the ranks agree on the loss, so a micro-batch that is non-finite on one rank has already sent NaN gradient
    buckets when both decide to skip it. Its gradients must be dropped without a trace: weights and gradient
    norms bitwise those of the run that checks the loss before the backward, on the same data."""
    data = str(tmp_path / "latents")
    # NaN posterior means at a few samples (each in a different micro-batch of 2 on one rank, some steps apart)
    write_synthetic_dataset(data, num_shards=4, samples_per_shard=8, nonfinite_indices=frozenset({3, 12, 21}))
    per_step = ("data.global_batch_size=4", "data.micro_batch_size=2")
    first = _train(data, tmp_path, True, overrides=per_step, name="first")
    after = _train(data, tmp_path, True, overrides=(*per_step, "engine.backward_before_loss_check=false"),
                   name="after")
    assert first["backward_first"] and not after["backward_first"]
    assert first["nonfinite_skipped"] == after["nonfinite_skipped"] > 0
    assert first["grad_norms"] == after["grad_norms"] and all(n > 0 for n in first["grad_norms"])
    differing = [k for k in first["weights"] if not torch.equal(first["weights"][k], after["weights"][k])]
    assert not differing, differing
    assert all(torch.isfinite(w).all() for w in first["weights"].values() if w.is_floating_point())
    assert first["held_between_steps"] == [0] * 3  # the skipped exchange's buckets were released too


def test_one_rank_skips_deepspeeds_identity_all_reduce(tmp_path):
    """One rank: DeepSpeed's stage 0 would flatten every gradient, all-reduce it over one rank and copy it back;
    the engine turns that off (tests/test_train_single.py checks the steps against a plain-PyTorch replay)."""
    data = str(tmp_path / "latents")
    write_synthetic_dataset(data, num_shards=4, samples_per_shard=8)
    single = _train(data, tmp_path, True, ranks=1)
    assert single["deepspeed_reduces"] == 0 and single["sent_before_finish"] == []
    assert all(n > 0 for n in single["grad_norms"])


@pytest.mark.gpu
def test_overlapped_allreduce_on_two_gpus(tmp_path):
    """The same comparison over NCCL on 2 GPUs (async all-reduces on NCCL's stream while CUDA's backward runs).
    cuDNN/cuBLAS backward kernels may differ in the last bits between runs, so close rather than bitwise."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    data = str(tmp_path / "latents")
    write_synthetic_dataset(data, num_shards=4, samples_per_shard=8)
    env = {"CUDA_VISIBLE_DEVICES": "0,1", "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
           "NVSHMEM_DISABLE_NVLS": "1"}
    ours, deepspeeds = _train(data, tmp_path, True, extra_env=env), _train(data, tmp_path, False, extra_env=env)
    assert ours["deepspeed_reduces"] == 0 and deepspeeds["deepspeed_reduces"] == 3
    torch.testing.assert_close(ours["grad_norms"], deepspeeds["grad_norms"], rtol=1e-5, atol=0)
    for k in ours["weights"]:
        torch.testing.assert_close(ours["weights"][k].cpu(), deepspeeds["weights"][k].cpu(), rtol=1e-5, atol=1e-6,
                                   msg=k)
    assert all(sent >= buckets // 2 for sent, buckets in ours["sent_before_finish"]), ours["sent_before_finish"]


def _bf16_exchange(tmp_path, device: str, extra_env: dict | None = None) -> dict:
    out = tmp_path / f"bf16_{device}.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_loopback_port()}", os.path.join(REPO, "tests", "grad_allreduce_bf16_probe.py"),
           str(out), device]
    done = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1", **(extra_env or {})),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return torch.load(out, weights_only=False)


def test_bf16_exchange_sums_the_bf16_rounded_fp32_accumulations(tmp_path):
    """engine.grad_allreduce_dtype=bf16: each rank's fp32 accumulation is rounded to bf16 once, the sum over the 2
    ranks is rounded to bf16 once (gloo adds in fp32), and the mean is read back into the fp32 bucket. Reference:
    the same roundings applied to the closed-form gradients in float64."""
    _check_bf16_exchange(_bf16_exchange(tmp_path, "cpu"))


@pytest.mark.gpu
def test_bf16_exchange_over_nccl(tmp_path):
    """The same closed-form check over NCCL on 2 GPUs (NCCL's bf16 sum of two values: one rounding, like gloo's)."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    _check_bf16_exchange(_bf16_exchange(tmp_path, "cuda", {"CUDA_VISIBLE_DEVICES": "0,1", "NCCL_NVLS_ENABLE": "0"}))


def _check_bf16_exchange(result: dict) -> None:
    assert result["dtypes"] == [torch.float32] * 3
    for i, got in enumerate(result["grads"]):
        per_rank = [(micro[0][i].double() + micro[1][i].double()).float() for micro in result["inputs"]]
        rounded = [g.to(torch.bfloat16).double() for g in per_rank]
        expected = ((rounded[0] + rounded[1]).to(torch.bfloat16).double() * 0.5).float()
        assert torch.equal(got, expected), (i, (got - expected).abs().max())
        exact_mean = (per_rank[0].double() + per_rank[1].double()) / 2
        assert not torch.equal(got.double(), exact_mean)  # the bf16 rounding is really there
        # three bf16 roundings (unit roundoff 2^-8 each: both ranks' values, then their sum), halved by the mean
        bound = 2 ** -8 * (per_rank[0].double().abs() + per_rank[1].double().abs()) * 1.01
        assert ((got.double() - exact_mean).abs() <= bound).all()
