"""The depthwise 3x3 convolution kernels (dig/ops/dwconv_triton.py) against an independent float64 reference:
y = bias + the sum of the nine shifted copies of the zero-padded token grid, each times its tap, written out in
plain torch ops; gradients by float64 autograd.

On the CPU the kernels run through Triton's interpreter, in a subprocess (tests/dwconv_interpret.py) since Triton
picks interpreted or compiled kernels at import: grids that are not square and one row high, channel counts that
leave a block partly masked, rows swept in several tiles, backward programs of several rows with the last group
running past the grid (forward and backward), no bias, the operator's three backwards (aten's and two Triton ones), float32 / bfloat16 / float16, autocast (the op casts as autocast casts a
convolution), torch.compile(fullgraph=True) around the op, and torch.library.opcheck on both operators. GPU tests
(`pytest -m gpu tests/test_dwconv.py`) run the comparison at DiG-XL/2's shapes and DiG's blocks with the kernels
against F.conv2d.

Tolerances, elementwise: |got - ref| <= rtol * |ref| + atol * max|ref|. The kernels sum in float32 and round once
to the output dtype: rtol is that dtype's rounding (bfloat16 one ulp, 2^-7: Triton's interpreter truncates where a
GPU rounds to nearest), atol covers float32 sums whose terms cancel. Inputs and cotangents are representable in
their dtypes, so the reference sees exactly what the kernels see.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from interpreter import run_interpreted

from dig.ops.dwconv_torch import depthwise_conv3x3_torch
from dig.ops.dwconv_triton import depthwise_conv3x3

f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
CASES = {  # id: ([N, H, W, C], dtype, bias?, autocast dtype or None, module settings)
    "fp32": ((2, 5, 7, 24), f32, True, None, {}),
    "fp32-rows-split-last-group-short": ((3, 7, 5, 40), f32, True, None, {"FWD_ROWS": 3, "BWD_ROWS": 3}),  # 3, 3, 1
    "fp32-forward-rows-split": ((2, 5, 3, 24), f32, True, None, {"FWD_ROWS": 2}),
    # rows of several tiles (2 tokens in the forward, 4 in the backward); channels 128 + 8 of 128
    "bf16-row-tiles-masked-channels": ((2, 4, 20, 136), bf16, True, None, {"TILE": 256, "BWD_TILE": 512}),
    "fp16-square": ((1, 6, 6, 32), f16, True, None, {"FWD_ROWS": 6, "BWD_ROWS": 6}),
    "no-bias": ((2, 3, 4, 16), f32, False, None, {}),
    "one-row": ((2, 1, 9, 8), f32, True, None, {}),
    "one-column": ((1, 9, 1, 8), f32, True, None, {"BWD_ROWS": 4}),
    "autocast-bf16": ((2, 5, 6, 24), f32, True, bf16, {"BWD_ROWS": 2}),
    # the operator's other backwards: aten's convolution backward (cuDNN on a GPU), and the split Triton one (dx by
    # the forward kernel with flipped taps, then the weight and bias gradients)
    "aten-backward-fp32": ((2, 5, 7, 24), f32, True, None, {"BACKWARD": "cudnn"}),
    "aten-backward-no-bias": ((2, 3, 4, 16), f32, False, None, {"BACKWARD": "cudnn"}),
    "split-backward-rows-split": ((3, 7, 5, 40), f32, True, None,
                                  {"BACKWARD": "triton_split", "FWD_ROWS": 3, "BWD_ROWS": 3}),
    "split-backward-bf16-strips": ((2, 4, 20, 136), bf16, True, None,
                                   {"BACKWARD": "triton_split", "TILE": 256, "BWD_TILE": 512}),
    "split-backward-no-bias-one-column": ((1, 9, 1, 8), f32, False, None, {"BACKWARD": "triton_split"}),
    "split-backward-autocast": ((2, 5, 6, 24), f32, True, bf16, {"BACKWARD": "triton_split", "BWD_ROWS": 2}),
    # the flat-token-tile kernels: tiles that cross rows and images, a last tile past the end, channel blocks partly
    # masked, the weight gradient summed by several programs over several tiles each (and one program)
    "tiles-fp32-tiles-cross-rows": ((3, 5, 7, 40), f32, True, None,
                                    {"FORWARD": "tiles", "BACKWARD": "tiles", "TILE_TOKENS": 16,
                                     "DW_TILE_TOKENS": 8, "DW_PROGRAMS": 3}),
    "tiles-bf16-masked-channels": ((2, 4, 6, 136), bf16, True, None,
                                   {"FORWARD": "tiles", "BACKWARD": "tiles", "TILE_CHANNELS": 64,
                                    "DW_TILE_CHANNELS": 32, "DW_PROGRAMS": 1}),
    "tiles-no-bias-one-column": ((1, 9, 1, 8), f32, False, None, {"FORWARD": "tiles", "BACKWARD": "tiles"}),
    "tiles-autocast": ((2, 5, 6, 24), f32, True, bf16, {"FORWARD": "tiles", "BACKWARD": "tiles"}),
    # aten's convolution forward inside the operator (the bias added outside it), dx by aten's convolution of dy
    # with the taps flipped, the weight gradient by the tile kernel (float32 only: the CPU's bfloat16 convolution
    # does not sum in float32; the GPU tests cover cuDNN in bfloat16)
    "aten-forward-aten-dx-fp32": ((2, 5, 7, 24), f32, True, None,
                                  {"FORWARD": "cudnn", "BACKWARD": "cudnn_dx", "DW_PROGRAMS": 4}),
    "aten-forward-no-bias": ((2, 3, 4, 16), f32, False, None, {"FORWARD": "cudnn", "BACKWARD": "cudnn_dx"}),
}
TRITON_BACKWARD = {"BACKWARD": "triton"}  # every case but the aten ones runs the Triton backward
RTOL = {f32: 1e-6, bf16: 2 ** -7, f16: 2 ** -10}
ATOL = 1e-5  # times max |ref|: float32 sums of up to N * H * W products


def make_case(shape, dtype, bias, rounding, seed, device="cpu"):
    """(x, weight, bias or None) in `dtype`, representable in `rounding` (the dtype the kernels compute from), and
    a float64 cotangent of y representable in y's dtype."""
    gen = torch.Generator(device=device).manual_seed(seed)
    C = shape[-1]

    def draw(*size):
        return torch.randn(size, generator=gen, device=device, dtype=torch.float64).to(rounding).to(dtype)

    x, weight, b = draw(*shape), draw(C, 1, 3, 3), draw(C) if bias else None
    cotangent = torch.randn(shape, generator=gen, device=device, dtype=torch.float64).to(rounding).double()
    return (x, weight, b), cotangent


def float64_reference(x, weight, bias, cotangent):
    """y and the gradients of <y, cotangent>: the nine shifted copies of the zero-padded grid, float64 autograd."""
    leaves = [None if t is None else t.detach().double().requires_grad_() for t in (x, weight, bias)]
    x64, w64, b64 = leaves
    H, W = x.shape[1:3]
    padded = F.pad(x64, (0, 0, 1, 1, 1, 1))  # (C: none, W: 1 each side, H: 1 each side)
    y = sum(w64[:, 0, a, b] * padded[:, a:a + H, b:b + W, :] for a in range(3) for b in range(3))
    if b64 is not None:
        y = y + b64
    (y * cotangent).sum().backward()
    return y.detach(), [None if t is None else t.grad for t in leaves]


def check(name, got, ref, dtype, rounding):
    assert got.dtype == dtype, f"{name}: dtype {got.dtype}, expected {dtype}"
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    err = (got.double() - ref).abs()
    bound = RTOL[rounding] * ref.abs() + ATOL * ref.abs().max()
    worst = (err / bound).argmax()
    assert (err <= bound).all(), (f"{name}: |got - ref| above rtol {RTOL[rounding]:g} * |ref| + {ATOL:g} * max|ref| "
                                  f"at {(err > bound).sum().item()} of {err.numel()} elements; worst: got "
                                  f"{got.flatten()[worst].item():.6g}, ref {ref.flatten()[worst].item():.6g}")


def check_against_float64(inputs, cotangent, y, grads, rounding):
    """y in the compute dtype `rounding`; each gradient in its input's dtype, rounded as `rounding` rounds."""
    y_ref, grads_ref = float64_reference(*inputs, cotangent)
    check("y", y, y_ref, rounding, rounding)
    for name, grad, grad_ref, t in zip(("dx", "dweight", "dbias"), grads, grads_ref, inputs):
        if t is None:
            assert grad is None
        else:
            check(name, grad, grad_ref, t.dtype, rounding)


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    """Every case, the compile check and opcheck, run once in one interpreter process."""
    folder = tmp_path_factory.mktemp("dwconv")
    cases = []
    for i, (name, (shape, dtype, bias, autocast, settings)) in enumerate(CASES.items()):
        inputs, cotangent = make_case(shape, dtype, bias, autocast or dtype, seed=i)
        cases.append({"id": name, "inputs": inputs, "cotangent": cotangent, "autocast": autocast,
                      "settings": {**TRITON_BACKWARD, **settings}})
    out = run_interpreted("dwconv_interpret.py", cases, folder)
    out["cases"] = {c["id"]: (c["inputs"], c["cotangent"], c["autocast"], r) for c, r in zip(cases, out["cases"])}
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_interpreted_kernels_match_float64(interpreted, case):
    inputs, cotangent, autocast, got = interpreted["cases"][case]
    check_against_float64(inputs, cotangent, got["y"], got["grads"], autocast or inputs[0].dtype)


def test_op_compiles_inside_one_graph(interpreted):
    """torch.compile(fullgraph=True) of elementwise ops around depthwise_conv3x3, forward and backward: dynamo
    traces the op without a graph break, the compiled function launches our two kernels (once each), and
    compiled = eager."""
    report = interpreted["compile"]
    assert report["graphs"] == 1 and report["graph_breaks"] == 0, report
    assert report["ops_in_graph"] == ["dig.depthwise_conv3x3"], report
    assert report["compiled_launches"] == report["eager_launches"] == {"forward": 1, "backward": 1}, report
    assert max(report["compiled_vs_eager"]) < 1e-6, report


def test_opcheck_passes_for_both_operators(interpreted):
    assert interpreted["opcheck"] == {}


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel-requested", "kernel-off"])
def test_cpu_without_interpreter_runs_the_reference(kernel):
    """CPU tensors outside the interpreter (either setting): F.conv2d, which matches the float64 reference."""
    (x, weight, bias), cotangent = make_case((2, 4, 5, 24), f32, True, f32, seed=9)
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    y = depthwise_conv3x3(*leaves, kernel=kernel)
    assert y.is_contiguous()
    (y.double() * cotangent).sum().backward()
    check_against_float64((x, weight, bias), cotangent, y.detach(), [t.grad for t in leaves], f32)
    assert torch.equal(y, depthwise_conv3x3_torch(x, weight, bias))


def test_mixed_dtypes_outside_autocast_fail_as_conv2d_does():
    """The kernel path takes one dtype (as F.conv2d does): mixed ones go to the reference, which refuses them."""
    x, weight, bias = torch.randn(1, 3, 3, 8).bfloat16(), torch.randn(8, 1, 3, 3), torch.randn(8)
    with pytest.raises(RuntimeError):
        depthwise_conv3x3(x, weight, bias)


@pytest.mark.parametrize("shapes", [((2, 3, 4), (4, 1, 3, 3), (4,)), ((1, 2, 3, 4), (4, 1, 5, 5), (4,)),
                                    ((1, 2, 3, 4), (4, 1, 3, 3), (3,))], ids=["x-dims", "kernel-size", "bias-size"])
def test_mismatched_shapes_are_a_clear_error(shapes):
    x, weight, bias = (torch.randn(s) for s in shapes)
    with pytest.raises(ValueError, match=r"x must be \[N, H, W, C\]"):
        depthwise_conv3x3(x, weight, bias)


# DiG-XL/2 (C = 1152): 256 px / 32 images, 1024 px / 8, and a grid that is not square with rows of several tiles
GPU_SHAPES = {"256px-b32": (32, 16, 16, 1152), "1024px-b8": (8, 64, 64, 1152), "12x40-b3": (3, 12, 40, 1152)}


@pytest.mark.gpu
@pytest.mark.parametrize("forward,backward", [("rows", "cudnn"), ("rows", "triton"), ("rows", "triton_split"),
                                              ("tiles", "tiles"), ("cudnn", "cudnn_dx")])
@pytest.mark.parametrize("dtype", [bf16, f32])
@pytest.mark.parametrize("shape", list(GPU_SHAPES))
def test_gpu_kernels_match_float64_dig_shapes(shape, dtype, forward, backward, monkeypatch):
    from dig.ops import dwconv_triton

    monkeypatch.setattr(dwconv_triton, "FORWARD", forward)
    monkeypatch.setattr(dwconv_triton, "BACKWARD", backward)
    inputs, cotangent = make_case(GPU_SHAPES[shape], dtype, True, dtype, seed=3, device="cuda")
    leaves = [t.clone().requires_grad_() for t in inputs]
    y = depthwise_conv3x3(*leaves)
    (y.double() * cotangent).sum().backward()
    check_against_float64(inputs, cotangent, y.detach(), [t.grad for t in leaves], dtype)


@pytest.mark.gpu
def test_gpu_compiled_function_matches_eager():
    """Inductor's real codegen around the op on a GPU: compiled (fullgraph) = eager, forward and gradients."""
    inputs, _ = make_case((4, 16, 16, 1152), f32, True, bf16, seed=4, device="cuda")

    def block(x, weight, bias):
        with torch.autocast("cuda", dtype=bf16):
            return (depthwise_conv3x3(x * 2, weight, bias).float() + 1).square()

    results = []
    for fn in (block, torch.compile(block, fullgraph=True)):
        leaves = [t.clone().requires_grad_() for t in inputs]
        y = fn(*leaves)
        y.sum().backward()
        results.append([y.detach(), *(t.grad for t in leaves)])
    for name, compiled, eager in zip(("y", "dx", "dweight", "dbias"), results[1], results[0]):
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.gpu
def test_gpu_dig_blocks_with_kernels_match_conv2d():
    """A DiG (four blocks: every scan direction, a grid that is not square) under bf16 autocast: the kernels and
    F.conv2d give the same output and gradients within bf16 rounding."""
    from dig.models import create_model

    torch.manual_seed(0)
    outputs = []
    for kernel in (True, False):
        torch.manual_seed(0)
        model = create_model("DiG-S/2", input_size=(16, 24), num_classes=10, depth=4,
                             dw_conv_kernel=kernel).cuda()
        for block in model.blocks:  # random taps and bias: the identity initialisation would hide tap mix-ups
            torch.nn.init.normal_(block.dw_conv.weight, std=0.3)
            torch.nn.init.normal_(block.dw_conv.bias, std=0.1)
        for name, p in model.named_parameters():  # and no zero-initialised layer that would stop the gradients
            if "adaLN_modulation" in name or name.startswith("final_layer"):
                torch.nn.init.normal_(p, std=0.02)
        gen = torch.Generator(device="cuda").manual_seed(1)
        x = torch.randn(3, 4, 16, 24, device="cuda", generator=gen)
        t, y = torch.tensor([1, 500, 999], device="cuda"), torch.tensor([0, 3, 10], device="cuda")
        with torch.autocast("cuda", dtype=bf16):
            out = model(x, t, y)
        out.float().square().mean().backward()
        grads = {n: p.grad for n, p in model.named_parameters() if "dw_conv" in n or n.startswith("x_embedder")}
        outputs.append((out.float(), grads))
    (out_k, grads_k), (out_ref, grads_ref) = outputs
    torch.testing.assert_close(out_k, out_ref, rtol=2e-2, atol=2e-2 * out_ref.abs().max().item())
    for name in grads_ref:
        ref = grads_ref[name]
        err = ((grads_k[name] - ref).norm() / ref.norm()).item()
        assert err < 2e-2, f"{name}: relative error {err:.3g}"
