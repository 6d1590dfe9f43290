"""The SwiGLU operator (dig/ops/swiglu_triton.py: silu(gate) * up, then the down projection, the product recomputed
by the backward kernel) against an independent float64 reference: gate * sigmoid(gate) * up @ weight^T in plain
torch ops, its gradients by float64 autograd.

On the CPU the kernels run through Triton's interpreter in a subprocess (tests/swiglu_interpret.py): F a multiple of
the column block and not (masked columns), several column blocks, rows not a multiple of a program's rows, float32 /
bfloat16 / float16, gates of +-20, torch.compile(fullgraph=True) around the op, torch.library.opcheck on both
operators, and DiG's SwiGLU with the operator against the same module with activation checkpointing. The GPU test
(`pytest -m gpu tests/test_swiglu.py`) runs the comparison at DiG-XL/2's shape.

Tolerance: norm-relative, ||got - ref|| <= tol * ||ref||. The kernels compute in float32 and round the product and
the gradients once to the dtype; the GEMMs then run in that dtype (cuBLAS, or the CPU's, accumulating in float32),
so the bound is a few roundings of the dtype: 1e-2 for bfloat16 (2^-8 per rounding), 2e-3 for float16, 1e-5 for
float32. A wrong term in the derivative is off by O(1).
"""
from __future__ import annotations

import pytest
import torch
from interpreter import run_interpreted

from dig.ops import swiglu_triton
from dig.ops.swiglu_torch import swiglu_down_torch

f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
CASES = {  # id: (leading shape, F, D, dtype, values, module settings)
    "f256-fp32": ((2, 9), 256, 24, f32, "normal", {}),  # 18 rows: one program of 16 rows and a partial one
    "f256-bf16": ((3, 40), 256, 48, bf16, "normal", {}),  # DiG's dtype
    "f48-masked-columns-fp16": ((2, 11), 48, 20, f16, "normal", {}),  # 48 of 64 columns
    "f300-two-column-blocks-bf16": ((1, 13), 300, 16, bf16, "normal", {}),  # 256 + 44 of 256
    "small-blocks-many-programs": ((3, 7), 96, 8, f32, "normal", {"BLOCK_F": 32, "TILE": 128}),  # 6 x 3 programs
    "large-gates-fp32": ((2, 5), 64, 12, f32, "extreme", {}),  # silu(-20) ~ -4e-8, sigmoid(20) ~ 1
    "large-gates-bf16": ((2, 5), 64, 12, bf16, "extreme", {}),
}
TOL = {f32: 1e-5, bf16: 1e-2, f16: 2e-3}


def make_case(lead, F, D, dtype, values, seed, device="cpu"):
    """(gate_up, weight) and a float64 cotangent of out that out's dtype represents exactly."""
    gen = torch.Generator(device=device).manual_seed(seed)
    gate_up = torch.randn(*lead, 2 * F, generator=gen, device=device, dtype=torch.float64)
    if values == "extreme":  # gates uniform in [-20, 20], half exactly +-20
        gate = gate_up[..., :F]
        edge = torch.rand(gate.shape, generator=gen, device=device) < 0.5
        uniform = 40 * torch.rand(gate.shape, generator=gen, device=device, dtype=torch.float64) - 20
        gate_up[..., :F] = torch.where(edge, 20 * gate.sign(), uniform)
    weight = torch.randn(D, F, generator=gen, device=device, dtype=torch.float64) / F ** 0.5
    cotangent = torch.randn(*lead, D, generator=gen, device=device, dtype=torch.float64).to(dtype).double()
    return (gate_up.to(dtype), weight.to(dtype)), cotangent


def float64_reference(gate_up, weight, cotangent):
    gate_up, weight = (x.detach().double().requires_grad_() for x in (gate_up, weight))
    F = weight.shape[1]
    gate, up = gate_up[..., :F], gate_up[..., F:]
    out = (gate * torch.sigmoid(gate) * up) @ weight.t()
    (out * cotangent).sum().backward()
    return out.detach(), [gate_up.grad, weight.grad]


def check(name, got, ref, dtype):
    assert got.dtype == dtype, f"{name}: dtype {got.dtype}, expected {dtype}"
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    rel = ((got.double() - ref).norm() / ref.norm()).item()
    assert rel <= TOL[dtype], f"{name}: norm-relative error {rel:.3g} > {TOL[dtype]:g}"


def check_against_float64(inputs, cotangent, out, grads):
    out_ref, grads_ref = float64_reference(*inputs, cotangent)
    check("out", out, out_ref, inputs[0].dtype)
    for name, grad, grad_ref, x in zip(("dgate_up", "dweight"), grads, grads_ref, inputs):
        check(name, grad, grad_ref, x.dtype)


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    cases = []
    for i, (name, (*case, settings)) in enumerate(CASES.items()):
        inputs, cotangent = make_case(*case, seed=i)
        cases.append({"id": name, "inputs": inputs, "cotangent": cotangent, "settings": settings})
    out = run_interpreted("swiglu_interpret.py", cases, tmp_path_factory.mktemp("swiglu"))
    out["cases"] = {c["id"]: (c["inputs"], c["cotangent"], r) for c, r in zip(cases, out["cases"])}
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_interpreted_kernels_match_float64(interpreted, case):
    inputs, cotangent, got = interpreted["cases"][case]
    check_against_float64(inputs, cotangent, got["out"], got["grads"])


def test_op_compiles_inside_one_graph(interpreted):
    """torch.compile(fullgraph=True) around swiglu_down, forward and backward: one graph without a break, the
    operator in it, its launchers run once each way, and compiled = eager."""
    report = interpreted["compile"]
    assert report["graphs"] == 1 and report["graph_breaks"] == 0, report
    assert report["ops_in_graph"] == ["dig.swiglu_down"], report
    assert report["compiled_launches"] == report["eager_launches"] == {"forward": 1, "backward": 1}, report
    assert max(report["compiled_vs_eager"]) < 1e-6, report


def test_opcheck_passes_for_both_operators(interpreted):
    assert interpreted["opcheck"] == {}


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_dig_swiglu_with_the_operator_matches_checkpointing(interpreted, autocast):
    """DiG's SwiGLU computes the same with the operator as with activation checkpointing, its other recompute, in
    float32 and under bf16 autocast with float32 parameters (as DiG trains: out in bf16, the weights' gradients in
    float32); the operator is what runs when `kernel` is on."""
    with_op, checkpointed = (interpreted["swiglu_module"][autocast, kernel] for kernel in (True, False))
    assert with_op["operator_calls"] == 1 and checkpointed["operator_calls"] == 0
    # what autograd keeps: gate/up ([2, 7, 2F]) and the weights, never the product ([2, 7, F] or [14, F])
    F = with_op["intermediate"]
    assert (2, 7, 2 * F) in with_op["saved"]
    assert (2, 7, F) not in with_op["saved"] and (14, F) not in with_op["saved"], with_op["saved"]
    assert with_op["y"].dtype == checkpointed["y"].dtype == (bf16 if autocast else f32)
    tol = 1e-2 if autocast else 1e-5  # bf16: the two paths round the product and gradients at different points
    for a, b in zip([with_op["y"], *with_op["grads"]], [checkpointed["y"], *checkpointed["grads"]]):
        assert a.dtype == b.dtype
        assert ((a.double() - b.double()).norm() / b.double().norm()).item() < tol


def test_float32_inputs_under_autocast_stay_float32(interpreted):
    """Autocast is still on inside a custom operator's implementation: the operator keeps its GEMMs in the inputs'
    dtype (float32 here, the dtype its fake implementation gives) and matches float64 at float32's tolerance."""
    got = interpreted["float32_under_autocast"]
    gate_up, weight = got["inputs"]
    check_against_float64((gate_up.float(), weight.float()), torch.ones_like(got["out"], dtype=torch.float64),
                          got["out"], got["grads"])


def test_reference_matches_the_independent_float64_reference():
    inputs, cotangent = make_case((2, 3), 40, 8, torch.float64, "extreme", seed=9)
    leaves = [x.clone().requires_grad_() for x in inputs]
    out = swiglu_down_torch(*leaves)
    (out * cotangent).sum().backward()
    out_ref, grads_ref = float64_reference(*inputs, cotangent)
    torch.testing.assert_close(out, out_ref, rtol=1e-12, atol=1e-12)
    for x, grad_ref in zip(leaves, grads_ref):
        torch.testing.assert_close(x.grad, grad_ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shapes", [((2, 3, 80), (24, 41)), ((2, 3, 80), (24, 40, 1))],
                         ids=["columns", "weight-dims"])
def test_mismatched_shapes_are_a_clear_error(shapes):
    gate_up, weight = (torch.randn(s) for s in shapes)
    with pytest.raises(ValueError, match="gate_up must be \\[..., 2F\\] and weight \\[D, F\\]"):
        swiglu_triton.swiglu_down(gate_up, weight)


def test_cpu_without_interpreter_is_refused():
    """Outside the interpreter a CPU tensor has no kernels: a clear error (DiG's SwiGLU checks kernels_apply first
    and checkpoints instead)."""
    gate_up, weight = torch.randn(2, 80), torch.randn(24, 40)
    assert not swiglu_triton.kernels_apply(gate_up)
    with pytest.raises(ValueError, match="no Triton kernels"):
        swiglu_triton.swiglu_down(gate_up, weight)


# DiG-XL/2 at 256 px, 32 images per GPU: 8192 tokens, F = 3072, D = 1152
@pytest.mark.gpu
@pytest.mark.parametrize("values", ["normal", "extreme"])
def test_gpu_kernels_match_float64_dig_shape(values):
    inputs, cotangent = make_case((32, 256), 3072, 1152, bf16, values, seed=3, device="cuda")
    leaves = [x.clone().requires_grad_() for x in inputs]
    out = swiglu_triton.swiglu_down(*leaves)
    (out.double() * cotangent).sum().backward()
    check_against_float64(inputs, cotangent, out.detach(), [x.grad for x in leaves])
