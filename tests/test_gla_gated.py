"""The GLA and its output norm-gate as one operator (dig/ops/gla_gated.py, DiG's packed_projections) on the CPU, through
Triton's interpreter, against float64: the token-by-token GLA recurrence followed by the norm-gate's torch
reference. Output and every gradient (the packed q | k | v | gate tensor's, the gates', the norm weight's); the
backward's kernels write dq, dk, dv and dgate into the columns of one gradient; a token order, the sequence split,
bf16, a misaligned column; compiled inside one graph. The same for the operator with the forget gate packed
(q | k | v | gate | r, the log decays logsigmoid(r W2^T + b) * scale computed in the kernels from the logits):
against float64 autograd of that gate followed by the recurrence. tests/test_gla.py runs the operators on a
GPU."""
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
# The forget gate packed: id -> (B, T, H, K, V, R, gate_scale, logit shift, dtype, token order, splits)
GATE_CASES = {
    "gate-dig-fp32": (2, 50, 2, 32, 64, 16, 1 / 16, 0.0, torch.float32, False, None),
    "gate-dig-bf16": (2, 45, 2, 32, 64, 16, 1 / 16, 0.0, torch.bfloat16, False, None),
    # logsigmoid(x) ~ -5 a token: a chunk decays ~80 nats, past the factorised path (the kernels' exact loop)
    "gate-strong-fp32": (1, 40, 2, 16, 32, 8, 1.0, -5.0, torch.float32, False, None),
    # several splits: the kernels give the log decays' gradient and the caller the logits'
    "gate-order-split3-bf16": (1, 130, 2, 20, 24, 8, 1 / 16, 0.0, torch.bfloat16, True, 3),
}
TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2}  # bf16: the GLA's "mixed" dots and bf16 in- and outputs
EPS = 1e-6


def _inputs(B, T, H, K, V, gates, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    qkvz = torch.randn(B, T, 2 * H * K + 2 * H * V, generator=gen).to(dtype)
    g = make_gates(gates, (B, T, H, K), gen).to(dtype)
    weight = 1 + 0.2 * torch.randn(V, generator=gen)
    return [qkvz, g, weight], torch.randn(B, T, H, V, generator=gen, dtype=torch.float64)


def _gate_inputs(B, T, H, K, V, R, shift, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    qkvzr = torch.randn(B, T, 2 * H * K + 2 * H * V + R, generator=gen).to(dtype)
    gate_weight = (torch.randn(H * K, R, generator=gen) / R ** 0.5).to(dtype)
    gate_bias = (shift + torch.randn(H * K, generator=gen)).to(dtype)
    weight = 1 + 0.2 * torch.randn(V, generator=gen)
    return [qkvzr, gate_weight, gate_bias, weight], torch.randn(B, T, H, V, generator=gen, dtype=torch.float64)


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    cases = []
    for i, (name, (B, T, H, K, V, gates, dtype, ordered, splits)) in enumerate(CASES.items()):
        inputs, cotangent = _inputs(B, T, H, K, V, gates, dtype, seed=i)
        order = torch.randperm(T, generator=torch.Generator().manual_seed(i)) if ordered else None
        cases.append({"inputs": inputs, "cotangent": cotangent, "eps": EPS, "order": order, "splits": splits})
    for i, (name, (B, T, H, K, V, R, gate_scale, shift, dtype, ordered, splits)) in enumerate(GATE_CASES.items()):
        inputs, cotangent = _gate_inputs(B, T, H, K, V, R, shift, dtype, seed=10 + i)
        order = torch.randperm(T, generator=torch.Generator().manual_seed(i)) if ordered else None
        cases.append({"inputs": inputs, "cotangent": cotangent, "eps": EPS, "order": order, "splits": splits,
                      "gate_scale": gate_scale})
    out = run_interpreted("gla_gated_interpret.py", cases, tmp_path_factory.mktemp("gla_gated"))
    results = dict(zip([*CASES, *GATE_CASES], zip(cases, out["cases"])))
    return results, out["compile"], out["compile_gate"]


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


@pytest.mark.parametrize("case", [*CASES, *GATE_CASES])
def test_backward_kernels_write_into_one_gradient(interpreted, case):
    """dq, dk, dv (the GLA's kernels) and dgate (the norm-gate's) went straight into their columns of the one
    gradient tensor, at its byte offsets q | k | v | gate (| r)."""
    if case in CASES:
        B, T, H, K, V, _, dtype, _, _ = CASES[case]
    else:
        B, T, H, K, V, _, _, _, dtype, _, _ = GATE_CASES[case]
    size = torch.empty(0, dtype=dtype).element_size()
    offsets = interpreted[0][case][1]["offsets"]
    assert offsets == {"dq, dk, dv": [0, H * K * size, 2 * H * K * size], "dgate": (2 * H * K + H * V) * size}


@pytest.mark.parametrize("which", [1, 2], ids=["gla_gated_packed", "gla_gated_packed_gate"])
def test_gated_operator_compiles_inside_one_graph(interpreted, which):
    report = interpreted[which]
    assert report["graph_breaks"] == 0 and report["graphs"] == 1, report
    assert report["ops_in_graph"] == [f"dig.{'gla_gated_packed' if which == 1 else 'gla_gated_packed_gate'}"], report
    assert report["compiled_launches"] == {"forward": 1, "backward": 1}, report
    assert max(report["compiled_vs_eager"]) < 1e-5, report


def _gate_reference(qkvzr, gate_weight, gate_bias, weight, gate_scale, H, K, order):
    """y in float64 from q | k | v | gate | r: g = logsigmoid(r W2^T + b) * gate_scale, then _reference; and the
    logits (their gradient kept)."""
    R = gate_weight.shape[1]
    qkvz, low_rank = qkvzr[..., :-R], qkvzr[..., -R:]
    logits = low_rank @ gate_weight.t() + gate_bias
    logits.retain_grad()
    g = torch.nn.functional.logsigmoid(logits) * gate_scale
    return _reference(qkvz, g.unflatten(-1, (H, K)), weight, order), logits


@pytest.mark.parametrize("case", list(GATE_CASES))
def test_operator_with_packed_forget_gate_matches_float64(interpreted, case):
    """Output and the gradients of qkvzr (each of q, k, v, gate, r on its own), the gate's W2 and b and the norm
    weight. bf16: the kernels round the log decays to bf16 as a model storing them would, the reference does not."""
    spec, got = interpreted[0][case]
    B, T, H, K, V, R, gate_scale, _, dtype, _, _ = GATE_CASES[case]
    leaves = [x.detach().double().requires_grad_() for x in spec["inputs"]]
    y_ref, logits = _gate_reference(*leaves, gate_scale, H, K, spec["order"])
    (y_ref * spec["cotangent"]).sum().backward()
    assert got["y"].dtype == dtype
    check("y", got["y"], y_ref, TOL[dtype])
    for name, grad, x, leaf in zip(("dqkvzr", "dweight"), got["grads"][::3], spec["inputs"][::3], leaves[::3]):
        assert grad.dtype == x.dtype, name
        check(name, grad, leaf.grad, TOL[dtype])
    # W2's and b's gradients are sums over every token of terms that cancel under strong decays: their error is
    # measured against the sum of the terms' magnitudes (a sum's error bound), not against the sum itself. float32:
    # 1e-4, as dg = the reverse sum of q*dq - k*dk (which cancel) carries float32's error into every term (in the
    # strong case db is 1.09e-4 off float64 relative to itself, 3.9e-5 against the bound, the same to three digits
    # when torch computes the gate and gla_gated_packed_triton the rest)
    dlogits, low_rank = logits.grad.flatten(0, 1), leaves[0].detach()[..., -R:].flatten(0, 1)
    bounds = {"dW2": dlogits.abs().t() @ low_rank.abs(), "db": dlogits.abs().sum(0)}
    for name, grad, x, leaf in zip(("dW2", "db"), got["grads"][1:3], spec["inputs"][1:3], leaves[1:3]):
        assert grad.dtype == x.dtype and grad.shape == leaf.shape, name
        err = ((grad.double() - leaf.grad).norm() / bounds[name].norm()).item()
        tol = {torch.float32: 1e-4, torch.bfloat16: TOL[torch.bfloat16]}[dtype]
        assert err <= tol, f"{name}: error {err:.3g} of the terms' magnitudes > {tol:g}"
    parts = lambda qkvzr: (*unpack_qkvz(qkvzr[..., :-R], H, K), qkvzr[..., -R:])  # noqa: E731
    for name, grad, ref in zip(("dq", "dk", "dv", "dgate", "dr"), parts(got["grads"][0]), parts(leaves[0].grad)):
        check(name, grad, ref, TOL[dtype])
