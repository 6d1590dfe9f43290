"""Token-mixer op benchmark, forward + backward in bf16: GLA (dig.ops.gla; each requested backend, e.g. fla's
chunk_gla and our fused Triton kernels) at DiG-XL shapes (18 heads, K=32, V=64) against SDPA at DiT-XL shapes
(16 heads, head dim 72), and GLA against its byte floor:
the bytes fwd+bwd must move at least (read q, k, g, v; write o; read q, k, g, v, do; write dq, dk, dg, dv) over
the measured copy bandwidth."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dig.ops import gla

from .common import median, time_ms

DIG_XL = dict(heads=18, k=32, v=64)
DIT_XL = dict(heads=16, d=72)


def gla_floor_bytes(batch: int, tokens: int, heads: int, k: int, v: int, itemsize: int = 2) -> dict[str, int]:
    """The bytes GLA's forward and backward must move at least."""
    per_token_head = {"fwd": 3 * k + v + v,  # read q, k, g, v; write o
                      "bwd": (3 * k + v + v) + (3 * k + v)}  # read q, k, g, v, do; write dq, dk, dg, dv
    return {d: n * itemsize * batch * tokens * heads for d, n in per_token_head.items()}


def gla_min_bytes(batch: int, tokens: int, heads: int, k: int, v: int, itemsize: int = 2) -> int:
    return sum(gla_floor_bytes(batch, tokens, heads, k, v, itemsize).values())


def sdpa_flops(batch: int, tokens: int, heads: int, d: int) -> float:
    """QK^T and PV forward (4 T^2 d per head), backward counted as 2x forward."""
    return 3 * 4.0 * batch * heads * tokens ** 2 * d


def _fwd_bwd(fn, inputs, cotangent):
    def run():
        out = fn(*inputs)
        return torch.autograd.grad(out, inputs, cotangent)
    return run


def bench_gla_vs_sdpa(batch: int, tokens: int, device: torch.device, *, copy_gbs: float | None = None,
                      peak_tflops: float | None = None, repeat: int = 10,
                      backends: tuple[str, ...] = ("auto",)) -> dict:
    """Columns `{backend}_ms` (and `{backend}_over_floor`) per GLA backend; `gla_ms` is the first backend's."""
    dt = torch.bfloat16
    h, k, v = DIG_XL["heads"], DIG_XL["k"], DIG_XL["v"]
    gen = torch.Generator(device=device).manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, device=device, dtype=dt, generator=gen)

    q, kk = rnd(batch, tokens, h, k), rnd(batch, tokens, h, k)
    vv = rnd(batch, tokens, h, v)
    g = (F.logsigmoid(rnd(batch, tokens, h, k).float()) / 16).to(dt)
    gla_inputs = [x.requires_grad_() for x in (q, kk, vv, g)]
    do = rnd(batch, tokens, h, v)
    backend_ms = {}
    for backend in backends:
        run = _fwd_bwd(lambda *a, b=backend: gla(*a, backend=b)[0], gla_inputs, do)
        backend_ms[backend] = median(time_ms(run, device, warmup=3, repeat=repeat))
    gla_ms = backend_ms[backends[0]]
    del gla_inputs, q, kk, vv, g, do

    hs, d = DIT_XL["heads"], DIT_XL["d"]
    sdpa_inputs = [rnd(batch, hs, tokens, d).requires_grad_() for _ in range(3)]
    sdpa_run = _fwd_bwd(F.scaled_dot_product_attention, sdpa_inputs, rnd(batch, hs, tokens, d))
    sdpa_ms = median(time_ms(sdpa_run, device, warmup=3, repeat=repeat))
    del sdpa_inputs

    row = {"batch": batch, "tokens": tokens, "gla_ms": gla_ms, "sdpa_ms": sdpa_ms, "sdpa/gla": sdpa_ms / gla_ms}
    row.update({f"{b}_ms": ms for b, ms in backend_ms.items()})
    if copy_gbs:
        floor_ms = gla_min_bytes(batch, tokens, h, k, v) / (copy_gbs * 1e9) * 1e3
        row.update(gla_floor_ms=floor_ms, gla_over_floor=gla_ms / floor_ms)
        row.update({f"{b}_over_floor": ms / floor_ms for b, ms in backend_ms.items()})
    if peak_tflops:
        row["sdpa_tflops"] = sdpa_flops(batch, tokens, hs, d) / (sdpa_ms * 1e-3) / 1e12
    return row
