"""The GLA forget-gate kernels (dig/ops/low_rank_gate_triton.py: logsigmoid(low @ weight^T + bias) / normalizer after
the 16-wide projection) against an independent float64 reference: the same expression in plain float64 torch ops,
logsigmoid written as -log(1 + exp(-x)) through softplus, gradients by float64 autograd.

On the CPU the kernels run through Triton's interpreter in a subprocess (tests/low_rank_gate_interpret.py): DiG's R =
16 and a masked R = 12, N not a multiple of the column block (masked columns), rows not a multiple of a program's
rows and several backward programs (the partial weight and bias gradients are summed), float32 / bfloat16 / float16
inputs with float32 parameters as DiG trains, pre-activations of +-30 (logsigmoid's
saturated ends), torch.compile(fullgraph=True) around the op, torch.library.opcheck on both operators, and DiG's GLA layer
with the kernels against the same layer without them. The GPU test (`pytest -m gpu tests/test_low_rank_gate.py`)
runs the comparison at DiG-XL/2's shape.

Tolerances, elementwise: |got - ref| <= rtol * |ref| + atol * max|ref|. The kernels compute in float32 and round
once to the output dtype: rtol is that rounding (bfloat16 one ulp, 2^-7, since Triton's interpreter truncates;
float16 2^-10; float32 1e-5); atol 1e-5 covers float32 sums of 16 to a few hundred terms.
"""
from __future__ import annotations

import pytest
import torch
from interpreter import run_interpreted

from dig.ops import low_rank_gate_triton
from dig.ops.low_rank_gate_torch import low_rank_gate_torch

f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
CASES = {  # id: (leading shape, R, N, low dtype, parameter dtype, values, module settings)
    "dig-r16-bf16": ((2, 40), 16, 96, bf16, f32, "normal", {}),  # 80 rows; 96 columns = 64 + 32 of 64
    "r16-fp32-two-backward-programs": ((3, 50), 16, 64, f32, f32, "normal", {}),  # 150 rows: 128 + 22
    "r16-fp16": ((1, 30), 16, 48, f16, f32, "normal", {}),
    "r12-masked-lanes-fp32": ((2, 7), 12, 40, f32, f32, "normal", {}),
    "bf16-parameters": ((2, 9), 16, 32, bf16, bf16, "normal", {}),
    "small-blocks-many-programs": ((3, 11), 16, 72, f32, f32, "normal",
                                   {"BLOCK_T": 16, "BLOCK_N": 16, "BLOCK_T_BWD": 16}),
    "saturated-fp32": ((2, 13), 16, 64, f32, f32, "extreme", {}),  # pre-activations of +-30
    "saturated-bf16": ((2, 13), 16, 64, bf16, f32, "extreme", {}),
}
RTOL = {f32: 1e-5, bf16: 2 ** -7, f16: 2 ** -10}
ATOL = 1e-5
NORMALIZER = 16.0


def make_case(lead, R, N, low_dtype, param_dtype, values, seed, device="cpu"):
    """(low, weight, bias) and a float64 cotangent of g that g's dtype represents exactly."""
    gen = torch.Generator(device=device).manual_seed(seed)
    low = torch.randn(*lead, R, generator=gen, device=device, dtype=torch.float64)
    weight = torch.randn(N, R, generator=gen, device=device, dtype=torch.float64) / R ** 0.5
    bias = torch.randn(N, generator=gen, device=device, dtype=torch.float64)
    if values == "extreme":  # low @ weight^T of +-30 on half the entries: logsigmoid ~ -30 or ~ -1e-13
        weight = 8 * weight
        bias = 30 * torch.sign(bias)
    cotangent = torch.randn(*lead, N, generator=gen, device=device, dtype=torch.float64).to(low_dtype).double()
    return (low.to(low_dtype), weight.to(param_dtype), bias.to(param_dtype)), cotangent


def float64_reference(low, weight, bias, cotangent, normalizer=NORMALIZER):
    low, weight, bias = (x.detach().double().requires_grad_() for x in (low, weight, bias))
    # (softplus returns x itself above its threshold, 20 by default: 2e-9 off there)
    g = -torch.nn.functional.softplus(-(low @ weight.t() + bias), threshold=500) / normalizer
    (g * cotangent).sum().backward()
    return g.detach(), [low.grad, weight.grad, bias.grad]


def check(name, got, ref, dtype):
    assert got.dtype == dtype, f"{name}: dtype {got.dtype}, expected {dtype}"
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    err = (got.double() - ref).abs()
    bound = RTOL[dtype] * ref.abs() + ATOL * ref.abs().max()
    worst = (err / bound).argmax()
    assert (err <= bound).all(), (f"{name}: |got - ref| above rtol {RTOL[dtype]:g} * |ref| + {ATOL:g} * max|ref| at "
                                  f"{(err > bound).sum().item()} of {err.numel()} elements; worst: got "
                                  f"{got.flatten()[worst].item():.6g}, ref {ref.flatten()[worst].item():.6g}")


def check_against_float64(inputs, cotangent, g, grads):
    g_ref, grads_ref = float64_reference(*inputs, cotangent)
    check("g", g, g_ref, inputs[0].dtype)
    for name, grad, grad_ref, x in zip(("dlow", "dweight", "dbias"), grads, grads_ref, inputs):
        check(name, grad, grad_ref, x.dtype)


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    cases = []
    for i, (name, (*case, settings)) in enumerate(CASES.items()):
        inputs, cotangent = make_case(*case, seed=i)
        cases.append({"id": name, "inputs": inputs, "normalizer": NORMALIZER, "cotangent": cotangent,
                      "settings": settings})
    out = run_interpreted("low_rank_gate_interpret.py", cases, tmp_path_factory.mktemp("low_rank_gate"))
    out["cases"] = {c["id"]: (c["inputs"], c["cotangent"], r) for c, r in zip(cases, out["cases"])}
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_interpreted_kernels_match_float64(interpreted, case):
    inputs, cotangent, got = interpreted["cases"][case]
    check_against_float64(inputs, cotangent, got["g"], got["grads"])


def test_op_compiles_inside_one_graph(interpreted):
    """torch.compile(fullgraph=True) around low_rank_gate, forward and backward: one graph without a break, the
    operator in it, its launchers run once each way, and compiled = eager."""
    report = interpreted["compile"]
    assert report["graphs"] == 1 and report["graph_breaks"] == 0, report
    assert report["ops_in_graph"] == ["dig.low_rank_gate"], report
    assert report["compiled_launches"] == report["eager_launches"] == {"forward": 1, "backward": 1}, report
    assert max(report["compiled_vs_eager"]) < 1e-6, report


def test_opcheck_passes_for_both_operators(interpreted):
    assert interpreted["opcheck"] == {}


def test_dig_gla_layer_with_the_kernels_matches_without(interpreted):
    """DiG's GLA layer (float32) computes the same output and gradients for every parameter with the forget-gate
    kernels as with the GEMM and logsigmoid, and the kernels are what runs when forget_gate_kernel is on."""
    with_kernels, without = interpreted["gla_layer"][True], interpreted["gla_layer"][False]
    assert with_kernels["kernel_calls"] == 1 and without["kernel_calls"] == 0
    pairs = [(with_kernels["y"], without["y"], "y")]
    pairs += [(with_kernels["grads"][k], without["grads"][k], k) for k in without["grads"]]
    assert {k for *_, k in pairs} >= {"x", "gk_proj.0.weight", "gk_proj.1.weight", "gk_proj.1.bias"}
    for a, b, name in pairs:
        assert ((a - b).norm() / b.norm()).item() < 1e-5, name


def test_reference_matches_the_independent_float64_reference():
    inputs, cotangent = make_case((2, 3), 16, 24, torch.float64, torch.float64, "extreme", seed=9)
    leaves = [x.clone().requires_grad_() for x in inputs]
    g = low_rank_gate_torch(*leaves, NORMALIZER)
    (g * cotangent).sum().backward()
    g_ref, grads_ref = float64_reference(*inputs, cotangent)
    torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=0)
    for x, grad_ref in zip(leaves, grads_ref):
        torch.testing.assert_close(x.grad, grad_ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shapes", [((2, 16), (40, 12), (40,)), ((2, 16), (40, 16), (39,)), ((2, 0), (40, 0), (40,))],
                         ids=["rank", "bias", "empty-rank"])
def test_mismatched_shapes_are_a_clear_error(shapes):
    low, weight, bias = (torch.randn(s) for s in shapes)
    with pytest.raises(ValueError, match="low must be"):
        low_rank_gate_triton.low_rank_gate(low, weight, bias, NORMALIZER)


def test_cpu_without_interpreter_is_refused():
    """Outside the interpreter a CPU tensor has no kernels: a clear error (DiG's GLA layer checks kernels_apply
    first and computes the torch expression instead)."""
    low, weight, bias = torch.randn(2, 16), torch.randn(40, 16), torch.randn(40)
    assert not low_rank_gate_triton.kernels_apply(low)
    with pytest.raises(ValueError, match="no Triton kernels"):
        low_rank_gate_triton.low_rank_gate(low, weight, bias, NORMALIZER)


# DiG-XL/2 at 256 px, 32 images per GPU: 8192 tokens, R = 16, N = 18 heads x 32
@pytest.mark.gpu
@pytest.mark.parametrize("values", ["normal", "extreme"])
def test_gpu_kernels_match_float64_dig_shape(values):
    inputs, cotangent = make_case((32, 256), 16, 576, bf16, f32, values, seed=3, device="cuda")
    leaves = [x.clone().requires_grad_() for x in inputs]
    g = low_rank_gate_triton.low_rank_gate(*leaves, NORMALIZER)
    (g.double() * cotangent).sum().backward()
    check_against_float64(inputs, cotangent, g.detach(), [x.grad for x in leaves])
