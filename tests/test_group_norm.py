"""GroupNorm (+ SiLU) kernels for channels-last activations (dig/ops/group_norm_triton.py), against float64
F.group_norm (+ F.silu), and the VAE encoder with its norms swapped for them (dig.vae.fuse_group_norms) against
diffusers' own encode.

On the CPU the kernels run through Triton's interpreter in a subprocess (tests/group_norm_interpret.py): one tile
and many tiles per program, several statistics splits with a short last split and a partial last tile, float32 /
bfloat16 / float16 with weights in another dtype, one channel per group, the [N, C, L] layout diffusers' attention
hands its norm, values far from zero (mean 1000, std 1: a one-pass E[x^2] - E[x]^2 loses the variance there),
a variance as small as eps (so eps counts), torch.compile(fullgraph=True) around the op, and
torch.library.opcheck with channels-last and NCHW inputs. GPU tests (`pytest -m gpu tests/test_group_norm.py`)
compare the kernels with float64 at the SD VAE encoder's six norm shapes (16 images + mirrors) and check that
the pipeline's compiled GPU encoder runs them.

Tolerance, elementwise: |got - ref| <= rtol * |ref| + atol * max|ref|, rtol the output dtype's rounding (bfloat16
one ulp, 2^-7: the interpreter truncates where a GPU rounds), atol 1e-5 (float32 sums); 2e-4 for the
far-from-zero case, where float32 arithmetic on values near 1000 rounds at 6e-5 (the mean, and x - mean).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from interpreter import run_interpreted

from dig.ops.group_norm_triton import group_norm_silu, kernels_apply

f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
CL = torch.channels_last
EPS = 1e-6
CASES = {  # id: (shape, groups, x dtype, weight dtype, silu, layout, values, module settings)
    "fp32-one-tile": ((2, 64, 5, 7), 32, f32, f32, True, "cl", "normal", {}),
    "bf16-tiles-and-splits": ((3, 32, 9, 4), 8, bf16, bf16, False, "cl", "normal", {"TILE": 64, "STATS_PROGRAMS": 6}),
    "fp16-weights-fp32": ((2, 128, 3, 3), 32, f16, f32, True, "cl", "normal", {}),
    "many-splits-short-last": ((1, 16, 33, 5), 4, f32, f32, True, "cl", "normal", {"TILE": 64, "STATS_PROGRAMS": 16}),
    "one-channel-per-group": ((2, 16, 4, 4), 16, f32, f32, False, "cl", "normal", {"TILE": 32}),
    "attention-layout": ((2, 64, 50), 32, bf16, bf16, False, "rows", "normal", {"TILE": 256}),
    "far-from-zero": ((2, 32, 16, 16), 8, f32, f32, False, "cl", "offset", {"TILE": 256, "STATS_PROGRAMS": 4}),
    "variance-near-eps": ((2, 32, 4, 4), 8, f32, f32, True, "cl", "small", {}),
}
RTOL = {f32: 1e-5, bf16: 2 ** -7, f16: 2 ** -10}


def make_case(shape, groups, dtype, weight_dtype, layout, values, seed, device="cpu"):
    gen = torch.Generator(device=device).manual_seed(seed)
    N, C = shape[:2]
    rows = torch.randn(N, *shape[2:], C, generator=gen, device=device, dtype=torch.float64)  # [N, *spatial, C]
    if values == "offset":
        rows = rows + 1000
    elif values == "small":  # std 1e-3: variance 1e-6 = EPS
        rows = 1e-3 * rows
    else:
        rows = 3 * rows + torch.linspace(-2, 2, C, device=device)
    x = rows.movedim(-1, 1).to(dtype)  # channels-last memory ([N, *spatial, C] rows)
    if layout == "cl":
        assert x.is_contiguous(memory_format=CL)
    weight = (1 + 0.3 * torch.randn(C, generator=gen, device=device, dtype=torch.float64)).to(weight_dtype)
    bias = (0.5 * torch.randn(C, generator=gen, device=device, dtype=torch.float64)).to(weight_dtype)
    return x, weight, bias


def float64_reference(x, groups, weight, bias, silu, eps=EPS):
    y = F.group_norm(x.double(), groups, weight.double(), bias.double(), eps)
    return F.silu(y) if silu else y


def check(name, got, ref, dtype, atol=1e-5):
    assert got.dtype == dtype and got.shape == ref.shape, (name, got.dtype, got.shape)
    err = (got.double() - ref).abs()
    bound = RTOL[dtype] * ref.abs() + atol * ref.abs().max()
    assert (err <= bound).all(), (f"{name}: {(err > bound).sum().item()} of {err.numel()} elements off; worst "
                                  f"|got - ref| {err.max().item():.3g}")


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("group_norm")
    cases = []
    for i, (name, (shape, groups, dtype, wdtype, silu, layout, values, settings)) in enumerate(CASES.items()):
        x, weight, bias = make_case(shape, groups, dtype, wdtype, layout, values, seed=i)
        cases.append({"id": name, "x": x, "groups": groups, "weight": weight, "bias": bias, "eps": EPS,
                      "silu": silu, "settings": settings})
    out = run_interpreted("group_norm_interpret.py", cases, folder)
    out["cases"] = {c["id"]: (c, r) for c, r in zip(cases, out["cases"])}
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_interpreted_kernels_match_float64(interpreted, case):
    inputs, got = interpreted["cases"][case]
    assert got["kernels"], "the kernels did not take this case"
    ref = float64_reference(inputs["x"], inputs["groups"], inputs["weight"], inputs["bias"], inputs["silu"])
    check(case, got["y"], ref, inputs["x"].dtype, atol=2e-4 if case == "far-from-zero" else 1e-5)
    assert got["y"].stride() == inputs["x"].stride(), "the output keeps the input's layout"


def test_cases_cover_several_tiles_and_splits(interpreted):
    layouts = {case: (got["tiles"], got["splits"]) for case, (_, got) in interpreted["cases"].items()}
    assert layouts["bf16-tiles-and-splits"][1] >= 2 and layouts["many-splits-short-last"][1] >= 8, layouts
    assert layouts["fp32-one-tile"] == (1, 1), layouts


def test_op_compiles_inside_one_graph(interpreted):
    report = interpreted["compile"]
    assert report["graphs"] == 1 and report["graph_breaks"] == 0, report
    assert report["ops_in_graph"] == ["dig.group_norm_silu"], report
    assert report["compiled_launches"] == report["eager_launches"] == 1, report
    assert report["compiled_vs_eager"] < 1e-6 and report["compiled_channels_last"], report


def test_opcheck_passes(interpreted):
    assert interpreted["opcheck"] == {}


def test_fused_encoder_matches_diffusers_encode(interpreted):
    """The tiny VAE's encoder with every GroupNorm swapped (SiLU folded in where a ResnetBlock2D or the encoder's
    output norm runs it next), channels-last float32 through the kernels, against diffusers' AutoencoderKL.encode."""
    enc = interpreted["encoder"]
    assert enc["norm_kinds"] == ["GroupNormSiLU"] and enc["kernel_calls"] == enc["norms"], enc["norm_kinds"]
    # tiny VAE: 4 down blocks x 1 resnet x 2 norms, mid block 2 resnets x 2 norms, conv_norm_out
    assert enc["fused_with_silu"] == 4 * 2 + 2 * 2 + 1
    torch.testing.assert_close(enc["mean"], enc["ref_mean"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(enc["std"], enc["ref_std"], rtol=1e-4, atol=1e-4)


def test_fallbacks_take_the_reference(monkeypatch):
    """NCHW memory, a gradient to take, a channel count that is not a power of two, weights of another size, and
    CPU tensors outside the interpreter: the torch reference, same values."""
    import dig.ops.group_norm_triton as module

    x, weight, bias = make_case((2, 32, 4, 4), 8, f32, f32, "cl", "normal", seed=9)
    x24, weight24, bias24 = make_case((2, 24, 4, 4), 8, f32, f32, "cl", "normal", seed=10)
    assert not module._INTERPRETED and not kernels_apply(x, 8, weight, bias)  # CPU, no interpreter
    monkeypatch.setattr(module, "_INTERPRETED", True)  # as under the interpreter: only the named reason is left
    assert kernels_apply(x, 8, weight, bias)
    assert not kernels_apply(x.contiguous(), 8, weight, bias)
    assert not kernels_apply(x.detach().requires_grad_(), 8, weight, bias)
    assert not kernels_apply(x24, 8, weight24, bias24)  # C = 24, dense channels-last
    assert not kernels_apply(x, 8, weight[:16], bias)
    monkeypatch.setattr(module, "_INTERPRETED", False)
    y = group_norm_silu(x, 8, weight, bias, EPS, True)
    check("cpu", y, float64_reference(x, 8, weight, bias, True), f32)
    with pytest.raises(ValueError, match="divisible by num_groups"):
        group_norm_silu(x, 5, weight, bias, EPS, True)


def test_fuse_group_norms_leaves_other_activations_alone():
    """A ResnetBlock2D with a time embedding keeps its SiLU (it also runs on the embedding) and plain norms."""
    from diffusers.models.resnet import ResnetBlock2D

    from dig.vae import GroupNormSiLU, fuse_group_norms

    block = ResnetBlock2D(in_channels=32, out_channels=32, temb_channels=16, groups=8)
    assert fuse_group_norms(block) == 0
    assert type(block.nonlinearity) is torch.nn.SiLU
    assert all(type(n) is GroupNormSiLU and not n.silu for n in (block.norm1, block.norm2))
    assert set(block.state_dict()) == set(ResnetBlock2D(in_channels=32, out_channels=32, temb_channels=16,
                                                        groups=8).state_dict())


def test_kernels_launch_reports_why_not():
    """On CPU tensors outside the interpreter Triton cannot launch: the probe the pipeline's GPU encoder runs
    before using the kernels returns the reason instead of raising."""
    from dig.ops.group_norm_triton import kernels_launch

    why = kernels_launch(torch.device("cpu"))
    assert isinstance(why, str) and why, why


def test_cpu_pipeline_encoder_keeps_torch_group_norm():
    """On CPUs the pipeline's encoder is what it was (fused_group_norm applies to GPUs)."""
    from data_pipeline.encoder import LatentEncoder
    from dig.vae import GroupNormSiLU

    with pytest.warns(UserWarning, match="RANDOM"):
        encoder = LatentEncoder("config:tiny", device="cpu", memory_format="channels_last")
    assert not encoder.fused_group_norm
    assert not any(isinstance(m, GroupNormSiLU) for m in encoder.step.modules())
    assert any(type(m) is torch.nn.GroupNorm for m in encoder.step.modules())


# The SD VAE encoder's six norm shapes at 256 px, 16 images + mirrors: [N, C, H, W]
SD_SHAPES = [(32, 128, 256, 256), (32, 128, 128, 128), (32, 256, 128, 128), (32, 256, 64, 64), (32, 512, 64, 64),
             (32, 512, 32, 32)]


@pytest.mark.gpu
@pytest.mark.parametrize("shape", SD_SHAPES, ids=lambda s: f"{s[1]}x{s[2]}")
@pytest.mark.parametrize("dtype", [bf16, f32])
def test_gpu_kernels_match_float64_sd_shapes(shape, dtype):
    x, weight, bias = make_case(shape, 32, dtype, dtype, "cl", "normal", seed=3, device="cuda")
    with torch.no_grad():
        assert kernels_apply(x, 32, weight, bias)
        y = group_norm_silu(x, 32, weight, bias, EPS, True)
    check("gpu", y, float64_reference(x, 32, weight, bias, True), dtype)


@pytest.mark.gpu
def test_gpu_pipeline_encoder_runs_the_kernels(monkeypatch):
    """The pipeline's compiled bf16 GPU encoder (memory_format auto) goes through the kernels: every norm of the
    tiny VAE launches them once per encode step."""
    import numpy as np

    import dig.ops.group_norm_triton as module
    from data_pipeline.encoder import LatentEncoder

    assert module.kernels_launch(torch.device("cuda")) is None
    launches = [0]
    inner = module._launch

    def counted(*args):
        launches[0] += 1
        return inner(*args)

    monkeypatch.setattr(module, "_launch", counted)
    torch._dynamo.reset()
    with pytest.warns(UserWarning, match="RANDOM"):
        encoder = LatentEncoder("config:tiny", precision="bf16", device="cuda", batch_size=4, compile=True)
    assert encoder.fused_group_norm and encoder.memory_format == "channels_last"
    norms = sum(isinstance(m, torch.nn.GroupNorm) for m in encoder.step.modules())
    crops = np.random.default_rng(0).integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
    encoder.encode_images(crops)
    launches[0] = 0
    mean, _ = encoder.encode_images(crops)
    assert launches[0] == norms and np.isfinite(mean).all(), (launches[0], norms)
    torch._dynamo.reset()
