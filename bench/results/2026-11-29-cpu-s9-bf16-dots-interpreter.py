"""Which GLA kernel's bf16 dots carry the gate gradient's error (BENCHMARKS.md, ninth session): strong decays with
an initial state, bf16 q/k/v, the kernels through Triton's interpreter (bf16 dots stood in by bf16-rounded float32
tiles) against the float64 torch backend, norm-relative errors, one line per DIG_GLA_DOTS_16BIT spec given.

    TRITON_INTERPRET=1 PYTHONPATH=. python bench/results/2026-11-29-cpu-s9-bf16-dots-interpreter.py tf32 bf16
"""
import importlib
import sys

import torch

sys.path.insert(0, "tests")
from test_gla import make_inputs, gla_torch, run_with_grads
m = importlib.import_module("dig.ops.gla_triton")

def norm_err(a, e):
    e = e.double()
    return ((a.double() - e).norm() / e.norm().clamp_min(1e-30)).item()

B, T, H, K, V = 1, 1024, 2, 32, 64
q, k, v, g, h0 = make_inputs(B, T, H, K, V, gates="strong", with_state=True, seed=T)
q, k, v = (x.to(torch.bfloat16) for x in (q, k, v))
gen = torch.Generator().manual_seed(99)
cot = (torch.randn(B, T, H, V, generator=gen), torch.randn(B, H, K, V, generator=gen))
inputs = (q, k, v, g, h0)
ref = run_with_grads(lambda *x: gla_torch(*x[:4], initial_state=x[4], output_final_state=True),
                     [x.double() for x in inputs], cot)
for combo in sys.argv[1:]:
    m.DOTS_16BIT = m.dots_16bit(combo)
    o, st, grads = run_with_grads(lambda *x: m.gla_triton(*x[:4], initial_state=x[4], output_final_state=True),
                                  inputs, cot)
    errs = {"o": norm_err(o, ref[0]), "state": norm_err(st, ref[1])}
    errs.update({n: norm_err(a, r) for n, a, r in zip(["dq", "dk", "dv", "dg", "dh0"], grads, ref[2])})
    print(combo, g.dtype, {n: f"{e:.2e}" for n, e in errs.items()}, flush=True)
