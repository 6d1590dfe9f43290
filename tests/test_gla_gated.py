"""The GLA and its output norm-gate as one operator (dig/ops/gla_gated.py, DiG's packed_projections) on the CPU, through
Triton's interpreter, against float64: the token-by-token GLA recurrence followed by the norm-gate's torch
reference. Output and every gradient (the packed q | k | v | gate tensor's, the gates', the norm weight's); the
backward's kernels write dq, dk, dv and dgate into the columns of one gradient; a token order, the sequence split,
bf16, a misaligned column; compiled inside one graph. tests/test_gla.py runs the operator on a GPU."""
from __future__ import annotations

import pytest
import torch

from interpreter import run_interpreted

from dig.ops.norm_gate_torch import rms_norm_swish_gate_torch
from dig.ops.token_rows import unpack_qkvz
from test_gla import check, make_gates
from test_gla_triton import recurrence_in_token_order

CASES = {  # id: (B, T, H, K, V, gates, dtype, token order, splits)
    "dig-fp32": (2, 50, 2, 32, 64, "dig", torch.float32, False, None),
    "order-split3-bf16-mixed": (1, 130, 2, 20, 24, "mixed", torch.bfloat16, True, 3),
    # H * K = 20 bf16 values: k's columns start 40 bytes in, misaligned for the kernels' vector loads (copied)
    "misaligned-k-strong-bf16": (1, 37, 1, 20, 24, "strong", torch.bfloat16, False, None),
}
TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2}  # bf16: the GLA's "mixed" dots and bf16 in- and outputs
EPS = 1e-6


def _inputs(B, T, H, K, V, gates, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    qkvz = torch.randn(B, T, 2 * H * K + 2 * H * V, generator=gen).to(dtype)
    g = make_gates(gates, (B, T, H, K), gen).to(dtype)
    weight = 1 + 0.2 * torch.randn(V, generator=gen)
    return [qkvz, g, weight], torch.randn(B, T, H, V, generator=gen, dtype=torch.float64)


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    cases = []
    for i, (name, (B, T, H, K, V, gates, dtype, ordered, splits)) in enumerate(CASES.items()):
        inputs, cotangent = _inputs(B, T, H, K, V, gates, dtype, seed=i)
        order = torch.randperm(T, generator=torch.Generator().manual_seed(i)) if ordered else None
        cases.append({"inputs": inputs, "cotangent": cotangent, "eps": EPS, "order": order, "splits": splits})
    out = run_interpreted("gla_gated_interpret.py", cases, tmp_path_factory.mktemp("gla_gated"))
    return {name: (case, result) for name, case, result in zip(CASES, cases, out["cases"])}, out["compile"]


def _reference(qkvz, g, weight, order):
    """y in float64: the GLA recurrence (in token order), then rms_norm(o) * weight * silu(gate)."""
    H, K = g.shape[2], g.shape[3]
    q, k, v, gate = unpack_qkvz(qkvz, H, K)
    o, _ = recurrence_in_token_order(q, k, v, g, K ** -0.5, None, order)
    return rms_norm_swish_gate_torch(o, gate, weight, EPS)


@pytest.mark.parametrize("case", list(CASES))
def test_gated_operator_matches_float64(interpreted, case):
    spec, got = interpreted[0][case]
    dtype = CASES[case][6]
    leaves = [x.detach().double().requires_grad_() for x in spec["inputs"]]
    y_ref = _reference(*leaves, spec["order"])
    (y_ref * spec["cotangent"]).sum().backward()
    assert got["y"].dtype == dtype
    check("y", got["y"], y_ref, TOL[dtype])
    for name, grad, x, leaf in zip(("dqkvz", "dg", "dweight"), got["grads"], spec["inputs"], leaves):
        assert grad.dtype == x.dtype, name
        check(name, grad, leaf.grad, TOL[dtype])
    H, K = spec["inputs"][1].shape[2:]
    for name, grad, ref in zip(("dq", "dk", "dv", "dgate"), unpack_qkvz(got["grads"][0], H, K),
                               unpack_qkvz(leaves[0].grad, H, K)):  # each part on its own: none hides in the rest
        check(name, grad, ref, TOL[dtype])


@pytest.mark.parametrize("case", list(CASES))
def test_backward_kernels_write_into_one_gradient(interpreted, case):
    """dq, dk, dv (the GLA's kernels) and dgate (the norm-gate's) went straight into their columns of the one
    gradient tensor, at its byte offsets q | k | v | gate."""
    B, T, H, K, V, _, dtype, _, _ = CASES[case]
    size = torch.empty(0, dtype=dtype).element_size()
    offsets = interpreted[0][case][1]["offsets"]
    assert offsets == {"dq, dk, dv": [0, H * K * size, 2 * H * K * size], "dgate": (2 * H * K + H * V) * size}


def test_gated_operator_compiles_inside_one_graph(interpreted):
    report = interpreted[1]
    assert report["graph_breaks"] == 0 and report["graphs"] == 1, report
    assert report["ops_in_graph"] == ["dig.gla_gated_packed"], report
    assert report["compiled_launches"] == {"forward": 1, "backward": 1}, report
    assert max(report["compiled_vs_eager"]) < 1e-5, report
