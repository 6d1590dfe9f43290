"""DiG's depthwise 3x3 convolution (dig/ops/dwconv.py: F.conv2d forward, the input gradient as a forward convolution
of dy with the taps flipped) against an independent float64 reference: y = bias + the sum of the nine shifted
copies of the zero-padded token grid, each times its tap, written out in plain torch ops; gradients by float64
autograd. On the CPU in float32 and float64 (grids that are not square, one row or one column high, no bias), with
frozen inputs, and under bf16 autocast against F.conv2d's; torch.compile keeps it in one graph whose backward
convolves dy instead of calling the input-gradient kernel; DiG's blocks with it equal DiG's blocks with F.conv2d.
GPU tests (`pytest -m gpu tests/test_dwconv.py`): bf16 and fp32 at DiG-XL/2's shapes, under autocast, and DiG's
blocks.

Tolerances, elementwise: |got - ref| <= rtol * magnitude + atol * max|ref|, with rtol the compute dtype's rounding
(bf16: one ulp, 2^-7, since y is rounded twice) and magnitude |ref| (for y with a bias, |y - bias| + |bias|: a bf16
convolution rounds its sum before the bias is added, as F.conv2d does on a GPU); atol covers float32 sums whose
terms cancel. Inputs and cotangents are
representable in their dtypes, so the reference sees exactly what the convolution sees.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dig.ops.dwconv import depthwise_conv3x3
from dig.ops.dwconv_torch import depthwise_conv3x3_torch

f32, f64, bf16 = torch.float32, torch.float64, torch.bfloat16
RTOL = {f64: 1e-12, f32: 1e-6, bf16: 2 ** -7}
ATOL = {f64: 1e-12, f32: 1e-5, bf16: 1e-5}  # times max |ref|: sums of up to N * H * W products


def make_case(shape, dtype, bias, rounding, seed, device="cpu"):
    """(x, weight, bias or None) in `dtype`, representable in `rounding` (the dtype the convolution computes in), and
    a float64 cotangent of y representable in y's dtype."""
    gen = torch.Generator(device=device).manual_seed(seed)
    C = shape[-1]

    def draw(*size):
        return torch.randn(size, generator=gen, device=device, dtype=torch.float64).to(rounding).to(dtype)

    x, weight, b = draw(*shape), draw(C, 1, 3, 3), draw(C) if bias else None
    cotangent = torch.randn(shape, generator=gen, device=device, dtype=torch.float64).to(rounding).double()
    return (x, weight, b), cotangent


def float64_reference(x, weight, bias, cotangent):
    """y without its bias, y, and the gradients of <y, cotangent>: the nine shifted copies of the zero-padded grid,
    float64 autograd."""
    leaves = [None if t is None else t.detach().double().requires_grad_() for t in (x, weight, bias)]
    x64, w64, b64 = leaves
    H, W = x.shape[1:3]
    padded = F.pad(x64, (0, 0, 1, 1, 1, 1))  # (C: none, W: 1 each side, H: 1 each side)
    conv = sum(w64[:, 0, a, b] * padded[:, a:a + H, b:b + W, :] for a in range(3) for b in range(3))
    y = conv if b64 is None else conv + b64
    (y * cotangent).sum().backward()
    return conv.detach(), y.detach(), [None if t is None else t.grad for t in leaves]


def check(name, got, ref, dtype, rounding, magnitude=None):
    assert got.dtype == dtype, f"{name}: dtype {got.dtype}, expected {dtype}"
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    err = (got.double() - ref).abs()
    bound = RTOL[rounding] * (ref.abs() if magnitude is None else magnitude) + ATOL[rounding] * ref.abs().max()
    worst = (err / bound).argmax()
    assert (err <= bound).all(), (f"{name}: |got - ref| above rtol {RTOL[rounding]:g} * |ref| + {ATOL[rounding]:g} * "
                                  f"max|ref| at {(err > bound).sum().item()} of {err.numel()} elements; worst: got "
                                  f"{got.flatten()[worst].item():.6g}, ref {ref.flatten()[worst].item():.6g}")


def run_and_check(inputs, cotangent, rounding, autocast=None):
    leaves = [None if t is None else t.clone().requires_grad_() for t in inputs]
    device = inputs[0].device.type
    with torch.autocast(device, dtype=autocast or bf16, enabled=autocast is not None):
        y = depthwise_conv3x3(*leaves)
    (y.double() * cotangent).sum().backward()
    conv, y_ref, grads_ref = float64_reference(*inputs, cotangent)
    bias = inputs[2]
    check("y", y.detach(), y_ref, rounding, rounding,
          None if bias is None else conv.abs() + bias.double().abs())
    for name, leaf, grad_ref, t in zip(("dx", "dweight", "dbias"), leaves, grads_ref, inputs):
        if t is None:
            assert leaf is None
        else:
            check(name, leaf.grad, grad_ref, t.dtype, rounding)


CPU_CASES = {  # id: ([N, H, W, C], dtype, bias?)
    "fp32": ((2, 5, 7, 24), f32, True),
    "fp64": ((3, 4, 6, 16), f64, True),
    "no-bias": ((2, 3, 4, 16), f32, False),
    "one-row": ((2, 1, 9, 8), f32, True),
    "one-column": ((1, 9, 1, 8), f64, True),
    "one-token": ((2, 1, 1, 4), f32, True),
}


@pytest.mark.parametrize("case", list(CPU_CASES))
def test_cpu_matches_float64(case):
    shape, dtype, bias = CPU_CASES[case]
    inputs, cotangent = make_case(shape, dtype, bias, dtype, seed=len(case))
    run_and_check(inputs, cotangent, dtype)


def test_compiled_is_one_graph_whose_backward_convolves_dy():
    """torch.compile(fullgraph=True) around the function: one graph, no break; the forward graph holds one
    convolution, the backward graph one (dx: dy convolved with the flipped taps) and a convolution backward for the
    weight only (output_mask [False, True, False]), not the input-gradient kernel; compiled = eager."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs = {}

    def keep(kind):
        def compiler(gm, example_inputs):
            graphs[kind] = gm
            return make_boxed_func(gm.forward)
        return compiler

    def block(x, weight, bias):
        return (depthwise_conv3x3(x * 2, weight, bias) + 1).square()

    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, backend=aot_autograd(fw_compiler=keep("fw"),
                                                                          bw_compiler=keep("bw")))
    (x, weight, bias), _ = make_case((2, 3, 5, 24), f32, True, f32, seed=0)
    results = []
    for fn in (block, compiled):
        leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
        y = fn(*leaves)
        y.sum().backward()
        results.append([y.detach(), *(t.grad for t in leaves)])
    for name, got, want in zip(("y", "dx", "dweight", "dbias"), results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=name)

    def calls(gm, target):
        return [n for n in gm.graph.nodes if n.op == "call_function" and n.target == target]

    aten = torch.ops.aten
    assert len(calls(graphs["fw"], aten.convolution.default)) == 1
    assert len(calls(graphs["bw"], aten.convolution.default)) == 1  # dx: dy convolved with the flipped taps
    backward_convs = calls(graphs["bw"], aten.convolution_backward.default)
    assert [n.args[-1] for n in backward_convs] == [[False, True, False]], "the input gradient must not come from " \
        "aten.convolution_backward"


@pytest.mark.parametrize("frozen", ["x", "weight", "bias", "weight+bias"])
def test_frozen_inputs_get_no_gradient_and_the_others_the_right_one(frozen):
    """Only the inputs that require a gradient get one (the Function skips the others' convolutions), equal to
    F.conv2d's."""
    (x, weight, bias), _ = make_case((2, 4, 5, 16), f32, True, f32, seed=7)
    grads = []
    for conv in (depthwise_conv3x3, depthwise_conv3x3_torch):
        leaves = [t.clone().requires_grad_(name not in frozen.split("+"))
                  for name, t in zip(("x", "weight", "bias"), (x, weight, bias))]
        conv(*leaves).square().sum().backward()
        grads.append([t.grad for t in leaves])
    for name, got, want in zip(("x", "weight", "bias"), *grads):
        if name in frozen.split("+"):
            assert got is None and want is None, name
        else:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=name)


def test_cpu_autocast_matches_conv2d_under_autocast():
    """float32 inputs under CPU bf16 autocast: computed from the same bf16 casts F.conv2d makes under autocast, y in
    bf16 and every gradient in float32 as F.conv2d's; float64 stays float64 (autocast leaves it alone). The CPU's
    bf16 convolutions do not sum in float32, so this compares with F.conv2d under autocast, not float64."""
    (x, weight, bias), _ = make_case((2, 6, 5, 32), f32, True, bf16, seed=8)
    results = []
    for flipped in (True, False):
        leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
        with torch.autocast("cpu", dtype=bf16):
            y = depthwise_conv3x3(*leaves, flipped_input_grad=flipped)
        y.float().square().sum().backward()
        results.append([y, *(t.grad for t in leaves)])
    for name, got, want in zip(("y", "dx", "dweight", "dbias"), *results):
        assert got.dtype == want.dtype == (bf16 if name == "y" else f32), (name, got.dtype, want.dtype)
        err = ((got.double() - want.double()).norm() / want.double().norm()).item()
        assert err < 2e-2, f"{name}: relative error {err:.3g}"
    with torch.autocast("cpu", dtype=bf16):
        assert depthwise_conv3x3(x.double(), weight.double(), bias.double()).dtype == f64


def dig_with_random_taps(flipped: bool, input_size, device="cpu"):
    """A four-block DiG-S/2 (every scan direction) whose depthwise convs have random taps and bias (the identity
    initialisation would hide tap mix-ups) and no zero-initialised layer that would stop the gradients."""
    from dig.models import create_model

    torch.manual_seed(0)
    model = create_model("DiG-S/2", input_size=input_size, num_classes=10, depth=4,
                         dw_conv_flipped_grad=flipped).to(device)
    for block in model.blocks:
        torch.nn.init.normal_(block.dw_conv.weight, std=0.3)
        torch.nn.init.normal_(block.dw_conv.bias, std=0.1)
    for name, p in model.named_parameters():
        if "adaLN_modulation" in name or name.startswith("final_layer"):
            torch.nn.init.normal_(p, std=0.02)
    return model


def test_dig_blocks_match_conv2d_backward():
    """A DiG (four blocks: every scan direction, a grid that is not square) in float32: the flipped input gradient
    and F.conv2d's backward give the same output and gradients."""
    outputs = []
    for flipped in (True, False):
        model = dig_with_random_taps(flipped, (8, 12))
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(2, 4, 8, 12, generator=gen)
        out = model(x, torch.tensor([1, 999]), torch.tensor([0, 3]))
        out.square().mean().backward()
        outputs.append((out.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (out_f, grads_f), (out_ref, grads_ref) = outputs
    torch.testing.assert_close(out_f, out_ref, rtol=0, atol=0)
    for name in grads_ref:
        torch.testing.assert_close(grads_f[name], grads_ref[name], rtol=1e-4, atol=1e-6, msg=name)


def test_mixed_dtypes_outside_autocast_fail_as_conv2d_does():
    x, weight, bias = torch.randn(1, 3, 3, 8).bfloat16(), torch.randn(8, 1, 3, 3), torch.randn(8)
    with pytest.raises(RuntimeError):
        depthwise_conv3x3(x, weight, bias)


@pytest.mark.parametrize("shapes", [((2, 3, 4), (4, 1, 3, 3), (4,)), ((1, 2, 3, 4), (4, 1, 5, 5), (4,)),
                                    ((1, 2, 3, 4), (4, 1, 3, 3), (3,))], ids=["x-dims", "kernel-size", "bias-size"])
def test_mismatched_shapes_are_a_clear_error(shapes):
    x, weight, bias = (torch.randn(s) for s in shapes)
    with pytest.raises(ValueError, match=r"x must be \[N, H, W, C\]"):
        depthwise_conv3x3(x, weight, bias)


# DiG-XL/2 (C = 1152): 256 px / 32 images, 1024 px / 8, and a grid that is not square
GPU_SHAPES = {"256px-b32": (32, 16, 16, 1152), "1024px-b8": (8, 64, 64, 1152), "12x40-b3": (3, 12, 40, 1152)}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [bf16, f32])
@pytest.mark.parametrize("shape", list(GPU_SHAPES))
def test_gpu_matches_float64_dig_shapes(shape, dtype, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # float32: IEEE sums, as the reference
    inputs, cotangent = make_case(GPU_SHAPES[shape], dtype, True, dtype, seed=3, device="cuda")
    run_and_check(inputs, cotangent, dtype)


@pytest.mark.gpu
def test_gpu_autocast_matches_float64():
    """float32 inputs under bf16 autocast: computed in bf16, as autocast runs F.conv2d; gradients back in float32."""
    inputs, cotangent = make_case((4, 16, 16, 1152), f32, True, bf16, seed=4, device="cuda")
    run_and_check(inputs, cotangent, bf16, autocast=bf16)


@pytest.mark.gpu
def test_gpu_dig_blocks_match_conv2d_backward():
    """DiG's blocks under bf16 autocast, compiled as training compiles them: the flipped input gradient and F.conv2d's
    backward give the same output and gradients within bf16 rounding."""
    outputs = []
    for flipped in (True, False):
        model = dig_with_random_taps(flipped, (16, 24), device="cuda")
        model.compile_blocks()
        gen = torch.Generator(device="cuda").manual_seed(1)
        x = torch.randn(3, 4, 16, 24, device="cuda", generator=gen)
        t, y = torch.tensor([1, 500, 999], device="cuda"), torch.tensor([0, 3, 10], device="cuda")
        with torch.autocast("cuda", dtype=bf16):
            out = model(x, t, y)
        out.float().square().mean().backward()
        grads = {n: p.grad for n, p in model.named_parameters() if "dw_conv" in n or n.startswith("x_embedder")}
        outputs.append((out.float(), grads))
    (out_f, grads_f), (out_ref, grads_ref) = outputs
    torch.testing.assert_close(out_f, out_ref, rtol=2e-2, atol=2e-2 * out_ref.abs().max().item())
    for name in grads_ref:
        ref = grads_ref[name]
        err = ((grads_f[name] - ref).norm() / ref.norm()).item()
        assert err < 2e-2, f"{name}: relative error {err:.3g}"
