"""Why a process's first checkpoint save blocks training for seconds, and what would not: host staging of a
checkpoint-sized set of GPU tensors (DiG-XL/2 under ZeRO-0: weights, AdamW's two moments and the EMA, fp32),
each way in a fresh process so that no way inherits another's pinned memory.

    python3 -m bench.bench_pinning --model DiG-XL/2

ways:
  pin-each          a pinned buffer per tensor (what dig's checkpoint stager does on its first save)
  pin-each-register the same with PYTORCH_CUDA_ALLOC_CONF=pinned_use_cuda_host_register:True,
                    pinned_num_register_threads:8 (malloc + cudaHostRegister from 8 threads, exact sizes)
  pin-slab          one pinned buffer for all tensors, views into it
  pin-slab-register the slab with the register setting
  copy-reuse        copies into buffers pinned before (every later save)
  device-clone      a copy of every tensor on the GPU itself (memory permitting)
  pin-beside-work   pinned buffers allocated while another thread runs rounds of small bf16 matmuls: how much slower they get
  pin-beside-work-register  the same with the register setting
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time

import torch

from .common import fmt_table

REGISTER = "pinned_use_cuda_host_register:True,pinned_num_register_threads:8"
WAYS = {"pin-each": None, "pin-each-register": REGISTER, "pin-slab": None, "pin-slab-register": REGISTER,
        "copy-reuse": None, "device-clone": None, "pin-beside-work": None,
        "pin-beside-work-register": REGISTER}


def checkpoint_tensors(model_name: str, copies: int) -> list[torch.Tensor]:
    from dig.models.registry import create_model

    with torch.device("meta"):
        model = create_model(model_name, input_size=32)
    shapes = [p.shape for p in model.parameters()]
    return [torch.randn(s, device="cuda") for _ in range(copies) for s in shapes]


def _pin_each(tensors):
    out = []
    for t in tensors:
        buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        buf.copy_(t, non_blocking=True)
        out.append(buf)
    torch.cuda.synchronize()
    return out


def _pin_slab(tensors):
    total = sum(t.numel() for t in tensors)
    slab = torch.empty(total, dtype=tensors[0].dtype, pin_memory=True)
    out, at = [], 0
    for t in tensors:
        view = slab[at:at + t.numel()].view(t.shape)
        view.copy_(t, non_blocking=True)
        out.append(view)
        at += t.numel()
    torch.cuda.synchronize()
    return out


def _matmul_times(stop: threading.Event | None, rounds: int = 20) -> list[float]:
    """Rounds of 64 small bf16 matmuls (many launches, like a training step), each synchronised: until `stop`
    is set (at least 5 rounds), or `rounds` rounds when there is no stop."""
    a = torch.randn(2048, 2048, device="cuda", dtype=torch.bfloat16)
    times = []
    while (len(times) < rounds) if stop is None else (not stop.is_set() or len(times) < 5):
        t0 = time.perf_counter()
        for _ in range(64):
            a @ a
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def run_way(way: str, model_name: str, copies: int) -> dict:
    tensors = checkpoint_tensors(model_name, copies)
    gb = sum(t.numel() * t.element_size() for t in tensors) / 1e9
    torch.cuda.synchronize()
    row = {"way": way, "GB": gb}
    t0 = time.perf_counter()
    if way.startswith("pin-each"):
        _pin_each(tensors)
    elif way.startswith("pin-slab"):
        _pin_slab(tensors)
    elif way == "copy-reuse":
        bufs = _pin_each(tensors)
        t0 = time.perf_counter()
        for b, t in zip(bufs, tensors):
            b.copy_(t, non_blocking=True)
        torch.cuda.synchronize()
    elif way == "device-clone":
        [t.clone() for t in tensors]
        torch.cuda.synchronize()
    elif way.startswith("pin-beside-work"):
        alone = _matmul_times(None)
        stop, result = threading.Event(), {}
        worker = threading.Thread(target=lambda: result.setdefault("times", _matmul_times(stop)))
        worker.start()
        t0 = time.perf_counter()
        [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]  # allocation only, as a pre-pin
        row["seconds"] = time.perf_counter() - t0
        stop.set()
        worker.join()
        beside = result["times"]
        row["matmul ms alone"] = statistics.median(alone)
        row["matmul ms beside (median / max)"] = f"{statistics.median(beside):.2f} / {max(beside):.1f}"
        return row
    row["seconds"] = time.perf_counter() - t0
    row["GB/s"] = gb / row["seconds"]
    return row


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="DiG-XL/2")
    ap.add_argument("--copies", type=int, default=4, help="state tensors per parameter (weights, 2 moments, EMA)")
    ap.add_argument("--ways", default=",".join(WAYS))
    ap.add_argument("--out", help="JSON file for the rows")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(run_way(args.one, args.model, args.copies)))
        return
    rows = []
    for way in args.ways.split(","):
        env = dict(os.environ)
        if WAYS[way]:
            env["PYTORCH_CUDA_ALLOC_CONF"] = WAYS[way]
        proc = subprocess.run([sys.executable, "-m", "bench.bench_pinning", "--model", args.model, "--copies",
                               str(args.copies), "--one", way], env=env, capture_output=True, text=True)
        if proc.returncode:
            rows.append({"way": way, "seconds": f"failed: {proc.stderr.strip().splitlines()[-1:]}"})
            continue
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    cols = ["way", "GB", "seconds", "GB/s", "matmul ms alone", "matmul ms beside (median / max)"]
    print(fmt_table(rows, [c for c in cols if any(c in r for r in rows)]))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
