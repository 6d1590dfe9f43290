"""The fused Triton GLA kernels (dig/ops/gla_triton*.py) on the CPU, through Triton's interpreter, against the
float64 token-by-token recurrence of test_gla.py: outputs, final states and all five input gradients.

Covers both intra-chunk paths (the factorised tensor-core path at DiG's gates; the exact per-key loop for strong
decays, and forced), sequences shorter than and not a multiple of a chunk, head sizes that are not powers of two
(masked lanes), chunk sizes 16/32/64, with and without states (without: the registered torch operator DiG
uses, also checked to compile inside one graph), the sequence split across programs at several split counts
(split lengths that leave a partial last split, one chunk per split, more splits asked than there are chunks),
a token order read in place (with and without states and splits), the forward's loads issued a chunk
ahead (PREFETCH), q, k, v (and g) sliced out of one [B, T, X] tensor as DiG's packed projections give them
(read in place at their token stride, gradients through the slicing; misaligned and transposed views copied first),
float32 and bf16 inputs, and the dots modes for bf16 inputs (DIG_GLA_DOTS_16BIT: "mixed", the
default, in every bf16 case; tf32 and bf16 everywhere in their own). The interpreter runs dots in float32, and its
dot takes bf16 tiles as raw bits, so there the kernels stand in for bf16 dots by rounding float32 tiles to bf16:
the same products. tests/test_gla.py runs the same kernels on a GPU (tensor cores) against the float64 oracle.
"""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from interpreter import run_interpreted

from dig.ops.token_rows import token_stride
from test_gla import FLA_TOL, _norm_err, check, make_inputs, recurrent_gla_float64, run_with_grads

PREFETCH = {"fwd": {"PREFETCH": True}}
KERNELS = importlib.import_module("dig.ops.gla_triton").KERNELS  # (imports torch only, not Triton)
CASES = {  # id: (B, T, H, K, V, gates, with_state, dtype, module settings); "op" cases: no final state either
    "dig-fp32": (1, 40, 2, 32, 64, "dig", True, torch.float32, {}),
    "masked-lanes-no-state": (2, 33, 1, 20, 24, "dig", False, torch.float32, {}),
    "op-dig": (2, 50, 2, 32, 64, "dig", False, torch.float32, {}),
    "op-strong-bf16": (1, 37, 3, 32, 64, "strong", False, torch.bfloat16, {}),
    "shorter-than-chunk": (1, 7, 2, 16, 16, "mixed", True, torch.float32, {}),
    "strong-decay-loop": (1, 50, 1, 32, 64, "strong", True, torch.float32, {}),
    "mixed-decay": (1, 45, 2, 32, 64, "mixed", True, torch.float32, {}),
    "forced-loop": (1, 40, 2, 32, 64, "dig", True, torch.float32, {"FACTORISED_MAX_DECAY": -1.0}),
    "chunk32": (1, 100, 2, 32, 64, "mixed", True, torch.float32, {"CHUNK": 32}),
    "chunk64-strong": (1, 70, 1, 32, 64, "strong", True, torch.float32, {"CHUNK": 64}),
    "bf16": (2, 70, 3, 32, 64, "dig", True, torch.bfloat16, {}),
    # bf16 q, k, v with float32 gates (not bf16 values): the gates' token sums take the "tf32x3" dots (the GPU tests'
    # inputs; the interpreter computes every dot in float32, so these check the sums' code and values, the GPU
    # tests their precision)
    "op-bf16-float32-gates-mixed": (2, 70, 3, 32, 64, "mixed", False, torch.bfloat16, {"gates_fp32": True}),
    "strong-bf16-float32-gates": (1, 45, 2, 32, 64, "strong", True, torch.bfloat16, {"gates_fp32": True}),
    # the sequence split across programs (stateless only): T not a multiple of a chunk or of a split
    "op-split2": (1, 100, 2, 32, 64, "dig", False, torch.float32, {"splits": 2}),
    "op-split3-strong": (2, 130, 1, 32, 64, "strong", False, torch.float32, {"splits": 3}),
    "op-split5-one-chunk-each-mixed": (1, 77, 2, 20, 24, "mixed", False, torch.float32, {"splits": 5}),
    "op-split-more-than-chunks": (1, 40, 1, 32, 64, "dig", False, torch.float32, {"splits": 50}),
    "op-split4-chunk32-bf16": (1, 200, 2, 32, 64, "dig", False, torch.bfloat16, {"splits": 4, "CHUNK": 32}),
    # a token order (DiG's scan directions read in place): the recurrence visits token order[s] at step s
    "op-order": (2, 50, 2, 32, 64, "dig", False, torch.float32, {"order": True}),
    "op-order-split3-mixed": (1, 130, 2, 20, 24, "mixed", False, torch.float32, {"order": True, "splits": 3}),
    "order-with-state": (1, 45, 2, 32, 64, "strong", True, torch.float32, {"order": True}),
    # the forward with its loads one chunk ahead (bench.tune_gla_launch's `p` option; not a default launch)
    "prefetch-with-state-mixed": (2, 50, 2, 32, 64, "mixed", True, torch.float32, {"LAUNCH_OVERRIDE": PREFETCH}),
    "op-prefetch-order-split3-strong": (1, 130, 2, 20, 24, "strong", False, torch.float32,
                                        {"order": True, "splits": 3, "LAUNCH_OVERRIDE": PREFETCH}),
    # every kernel's dots on bf16-rounded operands (DIG_GLA_DOTS_16BIT=bf16; the interpreter rounds float32 tiles)
    "op-all-bf16-dots-mixed-gates": (2, 70, 2, 32, 64, "mixed", False, torch.bfloat16,
                                     {"DOTS_16BIT": dict.fromkeys(KERNELS, "bf16")}),
    # the "mixed" dots mode (bf16 only where it cannot reach dg) under strong decays with a state, and bf16 dots
    # everywhere on the same inputs, which leave dg several times the tolerance off (test_..._lose_the_gate_gradient)
    "strong-bf16-mixed-dots": (1, 128, 2, 32, 64, "strong", True, torch.bfloat16,
                               {"DOTS_16BIT": dict.fromkeys(KERNELS, "mixed"), "seed": 3}),
    "strong-bf16-all-bf16-dots": (1, 128, 2, 32, 64, "strong", True, torch.bfloat16,
                                  {"DOTS_16BIT": dict.fromkeys(KERNELS, "bf16"), "seed": 3}),
    "strong-bf16-tf32-dots": (1, 128, 2, 32, 64, "strong", True, torch.bfloat16,
                              {"DOTS_16BIT": dict.fromkeys(KERNELS, "tf32"), "seed": 3}),
    # q, k, v (g too where named) sliced out of one [B, T, X] leaf: "rows" lists its columns in order, the inputs'
    # (H * K or H * V wide) and the widths of other columns between and after them (DiG's packed projections:
    # q, k, v, then the output gate's columns)
    "op-rows-dig-fp32": (2, 50, 2, 32, 64, "dig", False, torch.float32, {"rows": ("q", "k", "v", 48)}),
    "op-rows-order-bf16": (2, 45, 3, 32, 64, "mixed", False, torch.bfloat16,
                           {"rows": (8, "v", 24, "k", "g", "q", 40), "order": True, "seed": 41}),
    "op-rows-split2-bf16": (2, 100, 2, 32, 64, "dig", False, torch.bfloat16,
                            {"rows": ("q", "k", "v", "g", 72), "splits": 2}),
    "op-rows-prefetch-order-split3-strong": (1, 130, 2, 20, 24, "strong", False, torch.float32,
                                             {"rows": ("k", 4, "q", "v", "g", 12), "order": True, "splits": 3,
                                              "LAUNCH_OVERRIDE": PREFETCH}),
    "rows-with-state-mixed": (2, 40, 2, 32, 64, "mixed", True, torch.float32, {"rows": ("v", "q", 4, "k", 28)}),
    # v's rows start 3 elements (6 bytes) past a 16-byte boundary: v is copied first, q and k still read in place
    "op-rows-misaligned-v-bf16": (1, 37, 2, 32, 64, "dig", False, torch.bfloat16, {"rows": ("q", "k", 3, "v", 5)}),
    # heads outermost in memory ([B, H, T, D] transposed): not a row-strided view, copied first
    "op-transposed-copied": (2, 50, 2, 32, 64, "dig", False, torch.float32, {"transposed": True}),
    # the inputs of op-rows-order-bf16 as contiguous tensors (test_sliced_inputs_give_what_contiguous_ones_give)
    "op-contiguous-order-bf16": (2, 45, 3, 32, 64, "mixed", False, torch.bfloat16, {"order": True, "seed": 41}),
}
COPIED = {"op-rows-misaligned-v-bf16": {"v"}, "op-transposed-copied": {"q", "k", "v", "g"}}  # the rest: in place
LOSES_DG = {"strong-bf16-all-bf16-dots"}  # every other output checked; dg in the test named above
CASE_TOL = {"op-all-bf16-dots-mixed-gates": 3e-2}  # bf16 operands: about twice the error of bf16 in- and outputs
DEFAULTS = {"CHUNK": 16, "FACTORISED_MAX_DECAY": 40.0, "LAUNCH_OVERRIDE": {},
            "DOTS_16BIT": dict.fromkeys(KERNELS, "mixed")}  # the module's default (test_dots_precision_spec_...)
TOL = {torch.float32: 2e-5, torch.bfloat16: 1.5e-2}  # bf16: the output and gradients are rounded to bf16
# bf16 inputs' default "mixed" dots take o and dv from bf16 operands (about twice the rounding error alone); the
# final state, dq, dk and dg keep TF32's dots and the tolerance above
FROM_BF16_DOTS = {"o": 3e-2, "dv": 3e-2}


def _case_inputs(B, T, H, K, V, gates, with_state, dtype, seed, gate_dtype=None):
    q, k, v, g, h0 = make_inputs(B, T, H, K, V, gates=gates, with_state=with_state, seed=seed)
    q, k, v = (x.to(dtype) for x in (q, k, v))
    g = g.to(gate_dtype or dtype)
    gen = torch.Generator().manual_seed(seed + 1000)
    cotangents = (torch.randn(B, T, H, V, generator=gen, dtype=torch.float64),
                  torch.randn(B, H, K, V, generator=gen, dtype=torch.float64))
    return (q, k, v, g, h0), cotangents


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    """Every case run once in one interpreter process; returns {id: (inputs, cotangents, result)}."""
    folder = tmp_path_factory.mktemp("gla_triton")
    cases = []
    for i, (name, (*shape_and_kind, settings)) in enumerate(CASES.items()):
        settings = {**DEFAULTS, **settings}
        seed = settings.pop("seed", i)
        inputs, cotangents = _case_inputs(*shape_and_kind, seed=seed,
                                          gate_dtype=torch.float32 if settings.pop("gates_fp32", False) else None)
        _, T, H, K, V = shape_and_kind[:5]
        order = None
        if settings.pop("order", False):
            order = torch.randperm(T, generator=torch.Generator().manual_seed(seed))
        rows = settings.pop("rows", None)
        cases.append({"id": name, "inputs": inputs, "cotangents": cotangents, "splits": settings.pop("splits", None),
                      "order": order, "columns": rows and _columns(rows, H, K, V),
                      "transposed": settings.pop("transposed", False), "settings": settings,
                      "stateless": name.startswith("op-")})
    results = run_interpreted("gla_triton_interpret.py", cases, folder)
    return {c["id"]: (c["inputs"], c["cotangents"], c["order"], r) for c, r in zip(cases, results)}


def _columns(rows, H, K, V):
    """({input: its first column}, X) of a "rows" layout."""
    columns, width = {}, 0
    for item in rows:
        if isinstance(item, str):
            columns[item] = width
            width += H * (V if item == "v" else K)
        else:
            width += item
    return columns, width


def recurrence_in_token_order(q, k, v, g, scale, h0, order):
    """The float64 recurrence over the tokens taken in `order` (step s reads token order[s]), with each output
    put back at its token: what a token order asks of the kernels, by gathering and scattering."""
    if order is None:
        return recurrent_gla_float64(q, k, v, g, scale, h0)
    o, state = recurrent_gla_float64(q[:, order], k[:, order], v[:, order], g[:, order], scale, h0)
    return o[:, torch.argsort(order)], state


@pytest.mark.parametrize("case", list(CASES))
def test_interpreted_kernels_match_float64_recurrence(interpreted, case):
    inputs, cotangents, order, got = interpreted[case]
    dtype = CASES[case][7]
    def tol(name):
        return CASE_TOL.get(case, FROM_BF16_DOTS.get(name, TOL[dtype]) if dtype == torch.bfloat16 else TOL[dtype])
    scale = inputs[0].shape[-1] ** -0.5
    if case.startswith("op-"):  # no final state: its cotangent is zero
        cotangents = (cotangents[0], torch.zeros_like(cotangents[1]))
    o_ref, state_ref, grads_ref = run_with_grads(lambda *x: recurrence_in_token_order(*x[:4], scale, x[4], order),
                                                 inputs, cotangents)
    assert got["o"].dtype == dtype
    check("o", got["o"], o_ref, tol("o"))
    if case.startswith("op-"):
        assert got["state"] is None
    else:
        assert got["state"].dtype == torch.float32
        check("final_state", got["state"], state_ref, tol("final_state"))
    for name, grad, grad_ref, x in zip(["dq", "dk", "dv", "dg", "dh0"], got["grads"], grads_ref, inputs):
        if x is None or (name == "dg" and case in LOSES_DG):
            continue
        assert grad.dtype == x.dtype, name
        check(name, grad, grad_ref, tol(name))


def test_bf16_dots_everywhere_lose_the_gate_gradient_under_strong_decays(interpreted):
    """Why "mixed" keeps the dots that feed dq and dk in TF32: with them on bf16 too, dg = the reverse sum of
    q*dq - k*dk, which cancels under strong decays, is more than the GPU tests' norm tolerance (FLA_TOL) off float64
    on the same inputs where "mixed" stays far inside it (norm-relative: the error spreads over dg's small entries,
    which a max-relative check does not see)."""
    errors = {}
    for case in ("strong-bf16-mixed-dots", "strong-bf16-all-bf16-dots"):
        inputs, cotangents, _, got = interpreted[case]
        scale = inputs[0].shape[-1] ** -0.5
        *_, grads_ref = run_with_grads(lambda *x: recurrent_gla_float64(*x[:4], scale, x[4]), inputs, cotangents)
        errors[case] = _norm_err(got["grads"][3], grads_ref[3])
    assert errors["strong-bf16-mixed-dots"] < FLA_TOL[torch.bfloat16] / 3 < FLA_TOL[torch.bfloat16] < \
        errors["strong-bf16-all-bf16-dots"], errors


def test_mixed_dots_leave_the_state_and_dq_dk_dg_dh0_as_tf32_dots_do(interpreted):
    """"mixed" moves to bf16 only dots that cannot reach the final state, dq, dk, dg or dh0: on the same inputs
    those come out as with TF32 dots up to float32's summation order (the interpreter computes every dot in float32,
    and bf16 rounding of the exact bf16 operands of dA = do v^T changes no value), while o and dv, whose dots take
    bf16-rounded operands that were not bf16, differ by bf16's rounding.
    Not bit for bit: the interpreter's np.matmul sums in an order that depends on the CPU's BLAS kernel and the
    operands' memory layout (a transposed view or the contiguous copy that rounding makes), e.g. 4.8e-6 apart for
    a [16, 64] x [64, 16] product on an AVX-512 CPU."""
    _, _, _, mixed = interpreted["strong-bf16-mixed-dots"]
    _, _, _, tf32 = interpreted["strong-bf16-tf32-dots"]
    apart = {"state": _norm_err(mixed["state"], tf32["state"]), "o": _norm_err(mixed["o"], tf32["o"]),
             **{name: _norm_err(mixed["grads"][i], tf32["grads"][i])
                for i, name in enumerate(["dq", "dk", "dv", "dg", "dh0"])}}
    # (on an AVX-512 CPU: dg 6.8e-6 apart, the rest of the group 0; o and dv 4.0e-3 and 4.1e-3. A flipped bf16
    # rounding of a few of dq's or dk's entries would stay far below 2e-4.)
    assert all(apart[name] <= 2e-4 for name in ("state", "dq", "dk", "dg", "dh0")), apart
    assert all(apart[name] >= 1e-3 for name in ("o", "dv")), apart


def test_dots_cases_ran_every_kernel_at_their_precisions(interpreted):
    """Every kernel launched with (PRECISION, FAST_PRECISION) as its case's dots mode asks, bf16 dots as the
    interpreter's stand-in: float32 inputs in IEEE float32; bf16 inputs by default "mixed" (TF32, bf16)."""
    all_bf16 = ("bf16_rounded", "bf16_rounded")
    expected = {"op-all-bf16-dots-mixed-gates": all_bf16, "strong-bf16-all-bf16-dots": all_bf16,
                "strong-bf16-tf32-dots": ("tf32", "tf32")}
    for case, (*_, got) in interpreted.items():
        assert {name for name, *_ in got["launches"]} == set(KERNELS), case
        default = ("ieee", "ieee") if CASES[case][7] == torch.float32 else ("tf32", "bf16_rounded")  # "mixed"
        assert {tuple(p) for _, *p in got["launches"]} == {expected.get(case, default)}, case


def test_token_sums_ran_as_dots_for_16bit_inputs_and_as_scans_for_float32(interpreted):
    """The token sums' precision reached every launch, of the split kernels too, and dg's only the dk/dv/dg sweep:
    tl.cumsum ("scan") with float32 inputs; dots with bf16 inputs, TF32 for bf16 gates, three TF32 products for
    float32 gates and for dg. (The interpreter computes every dot in float32: the float64 comparisons of the same
    cases check the sums' values, the GPU tests their precision.)"""
    for case, (*_, got) in interpreted.items():
        dtype, settings = CASES[case][7], CASES[case][8]
        if dtype == torch.float32:
            gates, dg = "scan", "scan"
        else:
            gates, dg = ("tf32x3" if settings.get("gates_fp32") else "tf32"), "tf32x3"
        expected = {(name, gates, dg if name == "bwd_dkv" else None) for name, *_ in got["sums"]}
        assert set(map(tuple, got["sums"])) == expected, case
        assert {name for name, *_ in got["sums"]} >= set(KERNELS), case
        if settings.get("splits", 1) > 1:
            assert {"split_states", "split_state_grads"} <= {name for name, *_ in got["sums"]}, case


def test_dots_precision_spec_per_kernel_or_a_clear_error():
    module = importlib.import_module("dig.ops.gla_triton")
    assert module.dots_16bit("tf32") == {"fwd": "tf32", "bwd_dq": "tf32", "bwd_dkv": "tf32"}
    assert module.dots_16bit("bf16") == {"fwd": "bf16", "bwd_dq": "bf16", "bwd_dkv": "bf16"}
    assert module.dots_16bit("mixed") == {"fwd": "mixed", "bwd_dq": "mixed", "bwd_dkv": "mixed"}
    assert module.dots_16bit("fwd=bf16,bwd_dkv=mixed") == {"fwd": "bf16", "bwd_dq": "tf32", "bwd_dkv": "mixed"}
    repo = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, DIG_GLA_DOTS_16BIT="", PYTHONPATH=repo)  # set but empty: the default
    code = "import importlib; print(set(importlib.import_module('dig.ops.gla_triton').DOTS_16BIT.values()))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "{'mixed'}", out.stderr[-2000:]
    for bad in ("fp8", "fwd=fp16", "bwd=bf16", "fwd", "mixed,fwd=bf16"):
        with pytest.raises(ValueError, match="DIG_GLA_DOTS_16BIT"):
            module.dots_16bit(bad)


@pytest.mark.parametrize("tokens,splits", [(100, 2), (40, 50), (16 * 8 * 7 + 3, 3), (1, 4)])
def test_split_layout_covers_every_chunk_once(tokens, splits):
    module = importlib.import_module("dig.ops.gla_triton")
    count, per_split = module._split_layout(tokens, splits)
    chunks = -(-tokens // module.CHUNK)
    assert 1 <= count <= splits and (count - 1) * per_split < chunks <= count * per_split


def test_automatic_splits_fill_the_gpu_only_when_batch_times_heads_does_not():
    module = importlib.import_module("dig.ops.gla_triton")
    assert module.automatic_splits(sequences_heads=144, tokens=4096, sm_count=132) == 1
    splits = module.automatic_splits(sequences_heads=18, tokens=65536, sm_count=132)  # one image at 4096 px
    assert 18 * splits >= 132 and 65536 // (splits * module.CHUNK) >= module.MIN_SPLIT_CHUNKS
    assert module.automatic_splits(sequences_heads=18, tokens=64, sm_count=132) == 1  # too short to split


def test_dig_layer_compiles_with_the_kernel_inside_one_graph():
    """torch.compile(fullgraph=True) of DiG's GLA layer with backend "triton", with and without a token order, and
    with q, k, v and the gate packed (packed_projections; the same weights: what the separate projections give):
    the kernels are a registered operator, so there is no graph break around them, and compiled = eager (outputs
    and input gradients). And DiG's compiled blocks (packed projections, the default) save the packed q|k|v|gate
    projection, the gate logits and the GLA output row-major, the layout the kernels read."""
    worker = Path(__file__).with_name("gla_triton_compile_check.py")
    proc = subprocess.run([sys.executable, str(worker)], env={**os.environ, "TRITON_INTERPRET": "1"},
                          capture_output=True, text=True, timeout=600, cwd=Path(__file__).parents[1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    for name in ("", "ordered_", "packed_ordered_"):  # with a token order (DiG's scan_in_kernel); q | k | v | gate
        # packed (DiG's packed_projections)
        assert report[f"{name}graph_breaks"] == 0 and report[f"{name}graphs"] == 1, report
        assert report[f"{name}out_rel"] < 1e-5 and report[f"{name}grad_rel"] < 1e-5, report
    assert report["ordered_ops"] == ["dig.gla_fused_chunk", "dig.rms_norm_swish_gate"], report
    assert report["packed_ordered_ops"] == ["dig.gla_gated_packed"], report
    assert max(report["packed_vs_separate_rel"]) < 1e-5, report
    # Inductor's layout optimization (on for graphs with a convolution: DiG's depthwise conv) would store these
    # token-innermost, as if they were images, and copy them to and from the kernels' layout in every block.
    saved = report["block_saved_heads"]
    assert saved, "the compiled blocks saved no heads-split tensor: the check looks at nothing"
    assert any(len(s["shape"]) == 3 for s in saved), "the packed q|k|v|gate projection was not among them"
    row_major = [{"shape": s["shape"], "stride": list(torch.empty(s["shape"]).stride())} for s in saved]
    assert saved == row_major, saved


def test_row_strided_inputs_are_read_in_place_and_the_rest_copied(interpreted):
    """Every kernel launch (the sequence-split kernels' too) read each sliced input where the caller's view lies, at
    the big tensor's row width, and each contiguous input at H * K (H * V for v): the same constexpr strides as
    before row strides existed, so the same compiled kernels. Misaligned and transposed views were copied first."""
    for case, (*_, got) in interpreted.items():
        B, T, H, K, V, *_, settings = CASES[case]
        columns, width = _columns(settings["rows"], H, K, V) if "rows" in settings else ({}, None)
        launched = {kernel for kernel, _ in got["reads"]}
        assert launched == set(KERNELS) | ({"split_states", "split_state_grads"} if settings.get("splits") else set())
        for kernel, inputs in got["reads"]:
            assert set(inputs) == {"fwd": set("qkvg"), "bwd_dq": set("qkvg"), "bwd_dkv": set("qkvg"),
                                   "split_states": set("kvg"), "split_state_grads": set("qg")}[kernel], kernel
            for name, (in_place, stride) in inputs.items():
                copied = name in COPIED.get(case, ())
                assert in_place != copied, (case, kernel, name)
                packed = H * (V if name == "v" else K)
                assert stride == (width if name in columns and not copied else packed), (case, kernel, name)


def test_gradient_views_the_kernels_cannot_write_are_refused():
    """gla_triton._backward's grads_into (pure torch, before any kernel): dq and dk must share a token stride and
    every view be in [B, T, H, D] rows; anything else is a clear error, not gradients written to the wrong places."""
    module = importlib.import_module("dig.ops.gla_triton")
    B, T, H, K, V = 2, 5, 3, 8, 16
    q, v = torch.zeros(B, T, H, K), torch.zeros(B, T, H, V)
    packed = torch.zeros(B, T, 2 * H * K + H * V)
    dq, dk = packed[..., :H * K].view(B, T, H, K), packed[..., H * K:2 * H * K].view(B, T, H, K)
    dv = packed[..., 2 * H * K:].view(B, T, H, V)
    module._check_grads_into((dq, dk, dv), q, v)  # the packed layout: accepted
    bad = {"dk at another stride": (dq, torch.zeros(B, T, H, K), dv),
           "heads outermost": (dq, dk, torch.zeros(B, H, T, V).transpose(1, 2)),
           "another dtype": (dq, dk, dv.double())}
    for name, grads in bad.items():
        with pytest.raises(ValueError, match="grads_into"):
            module._check_grads_into(grads, q, v)
        with pytest.raises(ValueError, match="grads_into"):  # refused before any kernel runs
            module._backward(q, q, v, q, None, 1.0, v, None, False, grads_into=grads)


def test_gradients_are_written_contiguous_by_default(interpreted):
    """Without a gradient to write into (gla_gated.py's packed projections give one), the dk/dv/dg sweep wrote dq,
    dk and dv at H * K and H * V, even for sliced inputs: the constexpr strides of the kernels compiled before
    those strides existed."""
    for case, (*_, got) in interpreted.items():
        B, T, H, K, V, *_ = CASES[case]
        assert got["grad_strides"] and set(got["grad_strides"]) == {(H * K, H * V)}, case


@pytest.mark.parametrize("case", [c for c, (*_, settings) in CASES.items() if "rows" in settings])
def test_gradients_reach_the_tensor_the_inputs_were_sliced_from(interpreted, case):
    """The big [B, T, X] leaf's gradient: each input's columns hold that input's float64 gradient (computed on
    contiguous copies), every other column exactly zero."""
    inputs, cotangents, order, got = interpreted[case]
    B, T, H, K, V, _, _, dtype, settings = CASES[case]
    columns, width = _columns(settings["rows"], H, K, V)
    scale = K ** -0.5
    if case.startswith("op-"):
        cotangents = (cotangents[0], torch.zeros_like(cotangents[1]))
    *_, grads_ref = run_with_grads(lambda *x: recurrence_in_token_order(*x[:4], scale, x[4], order), inputs,
                                   cotangents)
    big_grad = got["big_grad"]
    assert big_grad.shape == (B, T, width) and big_grad.dtype == dtype
    others = torch.ones(width, dtype=torch.bool)
    for name, grad_ref in zip("qkvg", grads_ref):
        if name in columns:
            start, end = columns[name], columns[name] + H * (V if name == "v" else K)
            others[start:end] = False
            tol = FROM_BF16_DOTS.get(f"d{name}", TOL[dtype]) if dtype == torch.bfloat16 else TOL[dtype]
            check(f"d{name} in the big tensor", big_grad[..., start:end], grad_ref.flatten(2), tol)
    assert others.any() and not big_grad[..., others].any()


def test_sliced_inputs_give_what_contiguous_ones_give(interpreted):
    """Reading q, k, v, g in place at another stride changes only addresses: the same inputs as contiguous tensors
    give the same output and gradients, bit for bit."""
    *_, sliced = interpreted["op-rows-order-bf16"]
    *_, contiguous = interpreted["op-contiguous-order-bf16"]
    assert torch.equal(sliced["o"], contiguous["o"])
    for name, a, b in zip("qkvg", sliced["grads"], contiguous["grads"]):
        assert torch.equal(a, b), name


def _packed_projection_slices(B, T, H, K, V, dtype=torch.float32):
    """q, k, v as DiG's packed projections give them: views of one [B, T, X] tensor, its first 2 * H * K + H * V
    columns, then others."""
    big = torch.zeros(B, T, 2 * H * K + H * V + 24, dtype=dtype)
    return (big[..., :H * K].view(B, T, H, K), big[..., H * K:2 * H * K].view(B, T, H, K),
            big[..., 2 * H * K:2 * H * K + H * V].view(B, T, H, V))


def test_rows_in_place_keeps_row_strided_views_and_copies_the_rest():
    """gla_triton._rows_in_place (pure torch): a view is kept (no copy: same data pointer) when its heads and
    channels are packed in each token's row at a 16-byte aligned stride and start; anything else comes back as a
    contiguous copy, and token_rows.token_stride says the stride the kernels are then given."""
    module = importlib.import_module("dig.ops.gla_triton")
    for dtype in (torch.float32, torch.bfloat16):
        for x in _packed_projection_slices(2, 10, 18, 32, 64, dtype):
            assert module._rows_in_place(x) is x and token_stride(x) == 2 * 18 * 32 + 18 * 64 + 24
    one_image = _packed_projection_slices(1, 10, 18, 32, 64)[1]
    assert module._rows_in_place(one_image) is one_image
    every_second_token = torch.zeros(2, 10, 200)[:, ::2, :24].view(2, 5, 3, 8)
    assert module._rows_in_place(every_second_token) is every_second_token
    assert token_stride(every_second_token) == 400
    contiguous = torch.zeros(2, 10, 3, 8)
    assert module._rows_in_place(contiguous) is contiguous and token_stride(contiguous) == 24
    # T = 1 (and a size-1 batch): torch leaves those strides free; the kernels are given a stride that works
    single = torch.zeros(2, 1, 3, 8).as_strided((2, 1, 3, 8), (24, 5, 8, 1))
    assert single.is_contiguous() and token_stride(single) == 24
    assert token_stride(torch.zeros(1, 1, 3, 8).as_strided((1, 1, 3, 8), (7, 5, 8, 1))) == 24
    big = torch.zeros(2, 10, 200)
    copied = {
        "transposed": torch.zeros(2, 3, 10, 8).transpose(1, 2),   # heads outermost
        "channels strided": big[..., :48].view(2, 10, 3, 16)[..., ::2],
        "heads apart": big.view(2, 10, 5, 40)[..., :3, :8],      # gaps between the heads in a row
        "rows overlap": big.as_strided((2, 10, 3, 8), (160, 16, 8, 1)),
        "batch apart": torch.zeros(3, 10, 200)[::2, :, :24].view(2, 10, 3, 8),
        "misaligned start": big[..., 1:25].view(2, 10, 3, 8),
        "misaligned stride": torch.zeros(2, 10, 201)[..., :24].view(2, 10, 3, 8),
    }
    for why, x in copied.items():
        y = module._rows_in_place(x)
        assert y.is_contiguous() and y.data_ptr() != x.data_ptr() and torch.equal(y, x), why
        assert token_stride(y) == 24, why
