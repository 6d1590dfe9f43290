"""The GLA output norm-and-gate kernels (dig/ops/norm_gate_triton.py) against an independent float64 reference:
y = o / sqrt(mean(o^2) + eps) * weight * gate * sigmoid(gate) written out in plain torch ops, its gradients by
float64 autograd.

On the CPU the kernels run through Triton's interpreter, in a subprocess (tests/norm_gate_interpret.py) since
Triton picks interpreted or compiled kernels at import: head size 64 and 24 (masked lanes), rows not a multiple
of a program's block (one partial program; many programs, so that the partial weight gradients are summed),
float32 / bfloat16 / float16, gate and weight in other dtypes than o, gates of +-20 with o of 1e-3 (eps matters),
torch.compile(fullgraph=True) around the op, and torch.library.opcheck on both operators. GPU tests
(`pytest -m gpu tests/test_norm_gate.py`) run the same comparisons on CUDA at DiG-XL/2's shape.

Tolerances, elementwise: |got - ref| <= rtol * |ref| + atol * max|ref|. The kernels compute in float32 and round
once to the output dtype, so rtol is that dtype's rounding: for bfloat16 one ulp (2^-7), because Triton's
interpreter truncates float32 to bfloat16 where a GPU rounds to nearest (half an ulp); float16 (rounded to
nearest in both) 2^-10, float32 1e-5. The inputs and the cotangent are made representable in their dtypes, so
the reference sees exactly what the kernels see.
"""
from __future__ import annotations

import pytest
import torch
from interpreter import run_interpreted

from dig.ops.norm_gate_torch import rms_norm_swish_gate_torch
from dig.ops.norm_gate_triton import rms_norm_swish_gate

EPS = 1e-6
f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
CASES = {  # id: (shape [N, T, H, D], o dtype, gate dtype, weight dtype, values, module settings)
    "d64-fp32": ((2, 9, 3, 64), f32, f32, f32, "normal", {}),  # 54 rows: one program, partly masked
    "d64-bf16": ((2, 40, 3, 64), bf16, bf16, f32, "normal", {}),  # DiG's dtypes; 240 rows: 3 full programs + 48
    "d64-fp16": ((1, 30, 2, 64), f16, f16, f32, "normal", {}),
    "d24-masked-lanes": ((2, 7, 3, 24), f32, f32, f32, "normal", {}),  # 24 of 32 lanes, 42 of 128 rows
    "d24-bf16-many-programs": ((3, 11, 2, 24), bf16, bf16, f32, "normal", {"TILE": 256}),  # 8 rows each: 9 programs
    "rows-not-multiple-many-programs": ((3, 11, 2, 64), f32, f32, f32, "normal", {"TILE": 512}),  # 66 rows by 8
    "o-bf16-gate-fp32": ((2, 13, 3, 64), bf16, f32, f32, "normal", {}),
    "o-fp32-gate-bf16-weight-bf16": ((2, 13, 3, 64), f32, bf16, bf16, "normal", {}),
    "large-gate-small-o": ((2, 17, 3, 64), f32, f32, f32, "extreme", {}),  # eps ~ mean(o^2); silu(-20) ~ -4e-8
    "large-gate-small-o-bf16": ((2, 17, 3, 64), bf16, bf16, f32, "extreme", {"TILE": 1024}),
    # the gate as columns of a wider tensor (DiG's packed projections), read in place: 64 columns before it
    # and 16 after (bf16 rows of 272 elements: 16-byte aligned); 3 columns before: not aligned, copied first
    "gate-slice-in-place-bf16": ((2, 13, 3, 64), bf16, bf16, f32, "normal", {"gate_columns": (64, 16)}),
    "gate-slice-in-place-fp32-many-programs": ((3, 11, 2, 24), f32, f32, f32, "normal",
                                               {"gate_columns": (8, 4), "TILE": 256}),
    "gate-slice-misaligned-copied": ((2, 13, 3, 64), bf16, bf16, f32, "normal", {"gate_columns": (3, 5)}),
}
GATE_READ_IN_PLACE = {"gate-slice-in-place-bf16": True, "gate-slice-in-place-fp32-many-programs": True,
                      "gate-slice-misaligned-copied": False}
RTOL = {f32: 1e-5, bf16: 2 ** -7, f16: 2 ** -10}
ATOL = 1e-5  # times max |ref|: float32 rounding of the row sums and of do's difference dn - n * mean(dn * n)


def make_case(shape, o_dtype, gate_dtype, weight_dtype, values, seed, device="cpu"):
    """(o, gate, weight) and a float64 cotangent of y that y's dtype represents exactly."""
    gen = torch.Generator(device=device).manual_seed(seed)
    o = torch.randn(shape, generator=gen, device=device, dtype=torch.float64)
    gate = torch.randn(shape, generator=gen, device=device, dtype=torch.float64)
    if values == "extreme":  # o of 1e-3, so that mean(o^2) ~ eps; gates uniform in [-20, 20], half exactly +-20
        o = 1e-3 * o
        edge = torch.rand(shape, generator=gen, device=device) < 0.5
        uniform = 40 * torch.rand(shape, generator=gen, device=device, dtype=torch.float64) - 20
        gate = torch.where(edge, 20 * gate.sign(), uniform)
    weight = 1 + 0.3 * torch.randn(shape[-1], generator=gen, device=device, dtype=torch.float64)
    cotangent = torch.randn(shape, generator=gen, device=device, dtype=torch.float64).to(o_dtype).double()
    return (o.to(o_dtype), gate.to(gate_dtype), weight.to(weight_dtype)), cotangent


def float64_reference(o, gate, weight, cotangent, eps=EPS):
    """y and the gradients of <y, cotangent> for o, gate, weight: plain float64 torch ops and autograd."""
    o, gate, weight = (x.detach().double().requires_grad_() for x in (o, gate, weight))
    y = o / torch.sqrt(o.square().mean(-1, keepdim=True) + eps) * weight * (gate * torch.sigmoid(gate))
    (y * cotangent).sum().backward()
    return y.detach(), [o.grad, gate.grad, weight.grad]


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


def check_against_float64(inputs, cotangent, y, grads):
    y_ref, grads_ref = float64_reference(*inputs, cotangent)
    check("y", y, y_ref, inputs[0].dtype)
    for name, grad, grad_ref, x in zip(("do", "dgate", "dweight"), grads, grads_ref, inputs):
        check(name, grad, grad_ref, x.dtype)


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    """Every case, the compile check and opcheck, run once in one interpreter process."""
    folder = tmp_path_factory.mktemp("norm_gate")
    cases = []
    for i, (name, (*case, settings)) in enumerate(CASES.items()):
        inputs, cotangent = make_case(*case, seed=i)
        cases.append({"id": name, "inputs": inputs, "eps": EPS, "cotangent": cotangent, "settings": settings})
    out = run_interpreted("norm_gate_interpret.py", cases, folder)
    out["cases"] = {c["id"]: (c["inputs"], c["cotangent"], r) for c, r in zip(cases, out["cases"])}
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_interpreted_kernels_match_float64(interpreted, case):
    inputs, cotangent, got = interpreted["cases"][case]
    check_against_float64(inputs, cotangent, got["y"], got["grads"])
    if case in GATE_READ_IN_PLACE:  # a gate sliced from a wider tensor: read in place where aligned, else copied
        assert got["gate_read_in_place"] is GATE_READ_IN_PLACE[case]
        assert got["other_columns_grad_max"] == 0


def test_op_compiles_inside_one_graph(interpreted):
    """torch.compile(fullgraph=True) of elementwise ops around rms_norm_swish_gate, forward and backward: dynamo
    traces the op without a graph break, the compiled function launches our two kernels (once each), and
    compiled = eager."""
    report = interpreted["compile"]
    assert report["graphs"] == 1 and report["graph_breaks"] == 0, report
    assert report["ops_in_graph"] == ["dig.rms_norm_swish_gate"], report
    assert report["compiled_launches"] == report["eager_launches"] == {"forward": 1, "backward": 1}, report
    assert max(report["compiled_vs_eager"]) < 1e-6, report


def test_opcheck_passes_for_both_operators(interpreted):
    assert interpreted["opcheck"] == {}


def test_cpu_without_interpreter_falls_back_to_the_reference():
    """CPU tensors outside the interpreter, and float64 anywhere: the torch reference, the same values."""
    (o, gate, weight), _ = make_case((2, 5, 3, 64), bf16, bf16, f32, "normal", seed=0)
    assert torch.equal(rms_norm_swish_gate(o, gate, weight, EPS), rms_norm_swish_gate_torch(o, gate, weight, EPS))


@pytest.mark.parametrize("kernel", [False, True], ids=["torch", "kernel"])
@pytest.mark.parametrize("dtype", [f32, bf16])
def test_dig_layer_matches_float64(dtype, kernel):
    """DiG's RMSNormSwishGate (either setting; on the CPU both run the torch math) against the float64 reference,
    forward and gradients (o, gate in `dtype`, weight a float32 parameter)."""
    from dig.models.dig import RMSNormSwishGate

    (o, gate, weight), cotangent = make_case((2, 5, 3, 64), dtype, dtype, f32, "normal", seed=1)
    layer = RMSNormSwishGate(64, EPS, kernel=kernel)
    with torch.no_grad():
        layer.weight.copy_(weight)
    o_leaf, gate_leaf = o.clone().requires_grad_(), gate.clone().requires_grad_()
    y = layer(o_leaf, gate_leaf)
    (y.double() * cotangent).sum().backward()
    check_against_float64((o, gate, weight), cotangent, y.detach(), [o_leaf.grad, gate_leaf.grad, layer.weight.grad])


def test_reference_in_float64_matches_the_independent_reference():
    (o, gate, weight), cotangent = make_case((2, 5, 3, 24), torch.float64, torch.float64, torch.float64,
                                             "extreme", seed=2)
    leaves = [x.clone().requires_grad_() for x in (o, gate, weight)]
    y = rms_norm_swish_gate_torch(*leaves, EPS)
    (y * cotangent).sum().backward()
    y_ref, grads_ref = float64_reference(o, gate, weight, cotangent)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=0)
    for x, grad_ref in zip(leaves, grads_ref):
        torch.testing.assert_close(x.grad, grad_ref, rtol=1e-10, atol=1e-12 * grad_ref.abs().max().item())


@pytest.mark.parametrize("shapes", [((2, 3, 64), (2, 3, 32), (64,)), ((2, 3, 64), (2, 3, 64), (32,)),
                                    ((2, 3, 64), (2, 3, 64), (1, 64))], ids=["gate", "weight-size", "weight-dims"])
def test_mismatched_shapes_are_a_clear_error(shapes):
    o, gate, weight = (torch.randn(s) for s in shapes)
    with pytest.raises(ValueError, match="o and gate must share a shape"):
        rms_norm_swish_gate(o, gate, weight, EPS)


# DiG-XL/2 at 256 px, 32 images per GPU: [N, T, H, D]
DIG_XL_SHAPE = (32, 256, 18, 64)


@pytest.mark.gpu
@pytest.mark.parametrize("values", ["normal", "extreme"])
@pytest.mark.parametrize("gate_dtype", [bf16, f32], ids=["gate-bf16", "gate-fp32"])
def test_gpu_kernels_match_float64_dig_shape(gate_dtype, values):
    inputs, cotangent = make_case(DIG_XL_SHAPE, bf16, gate_dtype, f32, values, seed=3, device="cuda")
    leaves = [x.clone().requires_grad_() for x in inputs]
    y = rms_norm_swish_gate(*leaves, EPS)
    (y.double() * cotangent).sum().backward()
    check_against_float64(inputs, cotangent, y.detach(), [x.grad for x in leaves])


@pytest.mark.gpu
def test_gpu_compiled_block_matches_eager():
    """Inductor's real codegen around the op on a GPU: compiled (fullgraph) = eager, forward and gradients."""
    inputs, _ = make_case((4, 64, 18, 64), bf16, bf16, f32, "normal", seed=4, device="cuda")

    def block(o, gate, weight):
        return (rms_norm_swish_gate(o * 2, gate, weight, EPS).float() + 1).square()

    results = []
    for fn in (block, torch.compile(block, fullgraph=True)):
        leaves = [x.clone().requires_grad_() for x in inputs]
        y = fn(*leaves)
        y.sum().backward()
        results.append([y.detach(), *(x.grad for x in leaves)])
    for name, compiled, eager in zip(("y", "do", "dgate", "dweight"), results[1], results[0]):
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5, msg=name)
