"""dig.models: parameter counts against the official releases, scan order against hand-computed permutations,
initialisation properties, CFG, label dropout, registry errors. CPU, tiny models (big ones on the meta device)."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from dig.models import create_model, list_models
from dig.models.dig import GatedLinearAttention
from dig.models.scan import REVERSE_TRANSPOSE, reorient

SIZES = ["S", "B", "L", "XL"]
PATCHES = [2, 4, 8]
TINY = dict(depth=2, hidden_size=64, num_heads=2, input_size=8)


def trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def on_meta(name, **overrides):
    with torch.device("meta"):
        return create_model(name, **overrides)


def randomize(model, seed=0, std=0.1):
    """Overwrite every parameter (zero-inits included) so outputs depend on all of them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


# ------------------------------------------------------------------------------------------------ counts
# Trainable parameter counts at latent 32, 1000 classes, learn_sigma (official hustvl/DiG release).
DIG_RELEASE = {"DiG-S/2": 32_983_328, "DiG-B/2": 130_551_584, "DiG-L/2": 464_760_352, "DiG-XL/2": 675_659_040}
# DiT's published counts (DiT paper release / its train.py log) count every nn.Parameter, including the frozen
# sin-cos pos_embed Parameter (T * D), which is a non-persistent buffer here.
DIT_RELEASE = {"DiT-S/2": 32_963_360, "DiT-XL/2": 675_129_632}


@pytest.mark.parametrize("name", sorted(DIG_RELEASE))
def test_dig_trainable_parameters_equal_release(name):
    assert trainable(on_meta(name)) == DIG_RELEASE[name]


@pytest.mark.parametrize("name", sorted(DIT_RELEASE))
def test_dit_parameters_equal_release(name):
    model = on_meta(name)
    assert trainable(model) + model.pos_embed.numel() == DIT_RELEASE[name]
    assert not any(n == "pos_embed" for n, _ in model.named_parameters())


# Closed forms from the architecture description (DESIGN.md section 1 / DiT paper), for every size and patch.
_ARCH = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 18)}


def _shared(d, p, c_in=4, classes=1000):
    c_out = 2 * c_in
    embed = c_in * p * p * d + d + (256 * d + d) + (d * d + d) + (classes + 1) * d
    final = (d * 2 * d + 2 * d) + (d * p * p * c_out + p * p * c_out)
    return embed + final


def dig_closed_form(depth, d, heads, p, long_skip=False):
    inner = 256 * math.ceil(int(d * 4 * 2 / 3) / 256)
    mixer = 2 * d * (d // 2) + 3 * d * d + (d * 16 + 16 * (d // 2) + d // 2) + d // heads
    block = (d * 6 * d + 6 * d) + mixer + 3 * d * inner + (9 * d + d)
    skips = (depth // 2 - 1) * (2 * d * d + d) if long_skip else 0
    return _shared(d, p) + depth * block + skips


def dit_closed_form(depth, d, p):
    block = (d * 6 * d + 6 * d) + (3 * d * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d)
    return _shared(d, p) + depth * block


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("p", PATCHES)
def test_counts_match_closed_form_for_every_name(size, p):
    depth, d, heads = _ARCH[size]
    assert trainable(on_meta(f"DiG-{size}/{p}")) == dig_closed_form(depth, d, heads, p)
    assert trainable(on_meta(f"U-DiG-{size}/{p}")) == dig_closed_form(depth, d, heads, p, long_skip=True)
    assert trainable(on_meta(f"DiT-{size}/{p}")) == dit_closed_form(depth, d, p)


def test_dig_xl_uses_18_heads_dit_xl_16():
    assert on_meta("DiG-XL/2").blocks[0].attn.num_heads == 18
    assert on_meta("DiT-XL/2").blocks[0].attn.num_heads == 16
    assert on_meta("DiG-XL/2").blocks[0].mlp.intermediate_size == 3072


# ------------------------------------------------------------------------------------------------ shapes
def shape_only_gla(q, k, v, g, backend="auto", **_):
    """dig.ops' torch GLA validates gate values (data-dependent), which meta tensors cannot do."""
    assert q.shape == k.shape == g.shape and v.shape[:3] == q.shape[:3] and backend == "auto"
    return torch.empty_like(v), None


@pytest.mark.parametrize("name", list_models())
def test_every_name_forward_shape_on_meta(name, monkeypatch):
    monkeypatch.setattr("dig.models.dig.gla", shape_only_gla)
    model = on_meta(name, input_size=16)
    x = torch.randn(2, 4, 16, 16, device="meta")
    out = model(x, torch.tensor([1, 999], device="meta"), torch.tensor([3, 1000], device="meta"))
    assert out.shape == (2, 8, 16, 16)
    assert (model.in_channels, model.out_channels, model.num_classes, model.learn_sigma) == (4, 8, 1000, True)
    assert model.patch_size == int(name.split("/")[1]) and model.input_size == 16
    assert len(model.blocks) == model.depth and model.grad_checkpointing is False


@pytest.mark.parametrize("name", ["DiG-S/2", "U-DiG-S/2", "DiT-S/2"])
def test_tiny_cpu_forward_shapes(name):
    model = create_model(name, depth=4, hidden_size=32, num_heads=2, input_size=8, learn_sigma=False)
    out = model(torch.randn(3, 4, 8, 8), torch.tensor([0, 10, 999]), torch.tensor([0, 5, 1000]))
    assert out.shape == (3, 4, 8, 8) and model.out_channels == 4


def test_latent_shape_mismatch_is_rejected():
    model = create_model("DiG-S/2", **TINY)
    with pytest.raises(ValueError, match="expected latents of shape"):
        model(torch.randn(1, 4, 16, 16), torch.tensor([1]), torch.tensor([1]))
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        create_model("DiG-S/4", **{**TINY, "input_size": 10})


# -------------------------------------------------------------------------------------------- scan order
class Recorder(torch.nn.Module):
    """Stands in for a DiG block: records the token ids and grid it works on (after the reorientation a block
    applies to its input, when asked to: scan.reorient, a plain flip/transpose), returns them unchanged."""

    def __init__(self, log, index, has_skip):
        super().__init__()
        self.log, self.index = log, index
        self.skip_linear = torch.nn.Identity() if has_skip else None

    def forward(self, x, c, grid, skip=None, token_order=None, conv_taps=None, reorient_input=None,
                transposed=False):
        assert token_order is None and conv_taps is None
        if reorient_input is not None:  # x fills the grid before this block's reorientation
            before = grid[::-1] if transposed != (reorient_input == REVERSE_TRANSPOSE) else grid
            x, after = reorient(x, tuple(before), reorient_input)
            assert after == (grid[::-1] if transposed else grid)
        grid = grid[::-1] if transposed else grid
        ids = lambda z: [int(v) for v in z[0, :, 0]]  # noqa: E731
        self.log.append((self.index, ids(x), tuple(grid), None if skip is None else ids(skip)))
        return x


def expected_order(direction, rows, cols):
    """Raster ids of an rows x cols grid read in one of the four scan directions, and the grid read."""
    row_major = [r * cols + c for r in range(rows) for c in range(cols)]
    col_major = [r * cols + c for c in range(cols) for r in range(rows)]
    return {0: (row_major, (rows, cols)), 1: (row_major[::-1], (rows, cols)),
            2: (col_major, (cols, rows)), 3: (col_major[::-1], (cols, rows))}[direction]


def run_with_recorders(model, long_skip_blocks=()):
    log = []
    model.blocks = torch.nn.ModuleList(
        [Recorder(log, i, i in long_skip_blocks) for i in range(len(model.blocks))])
    rows, cols = model.grid_size
    x = torch.arange(rows * cols, dtype=torch.float32).reshape(1, -1, 1).repeat(1, 1, model.hidden_size)
    out = model.forward_blocks(x, torch.zeros(1, model.hidden_size))
    return log, [int(v) for v in out[0, :, 0]]


@pytest.mark.parametrize("input_size", [6, (4, 6)], ids=["3x3", "2x3"])
@pytest.mark.parametrize("depth", [1, 2, 3, 4, 5, 6])
def test_scan_visits_four_directions_and_restores_raster(depth, input_size):
    model = create_model("DiG-S/2", depth=depth, hidden_size=8, num_heads=2, input_size=input_size)
    rows, cols = model.grid_size
    log, final = run_with_recorders(model)
    assert [entry[0] for entry in log] == list(range(depth))
    for i, ids, grid, _ in log:
        assert (ids, grid) == expected_order(i % 4, rows, cols), f"block {i}"
    assert final == list(range(rows * cols))
    if depth >= 4:
        assert {tuple(ids) for _, ids, _, _ in log[:4]} == {tuple(expected_order(k, rows, cols)[0]) for k in range(4)}


def test_u_dig_skips_pair_blocks_as_in_release():
    depth = 8  # skips from blocks 0..2 (outputs, after their reorientation) into blocks 7..5; block 4 has none
    model = create_model("U-DiG-S/2", depth=depth, hidden_size=8, num_heads=2, input_size=6)
    assert [b.skip_linear is not None for b in model.blocks] == [i > depth // 2 for i in range(depth)]
    rows, cols = model.grid_size
    log, final = run_with_recorders(model, long_skip_blocks={5, 6, 7})
    assert final == list(range(rows * cols))
    for i, _, _, skip in log:
        if i <= depth // 2:
            assert skip is None
        else:  # the output of block j = depth-1-i, i.e. the input order of block j + 1
            assert skip == expected_order((depth - i) % 4, rows, cols)[0], f"block {i}"


@pytest.mark.parametrize("input_size", [6, (4, 6)], ids=["3x3", "2x3"])
def test_scan_in_kernel_token_orders_are_the_four_directions(input_size):
    from dig.models.dig import scan_directions

    model = create_model("DiG-S/2", depth=2, hidden_size=8, num_heads=2, input_size=input_size)
    rows, cols = model.grid_size
    orders, _ = scan_directions((rows, cols))
    assert orders.dtype == torch.int32
    assert [o.tolist() for o in orders] == [expected_order(d, rows, cols)[0] for d in range(4)]


@pytest.mark.parametrize("input_size", [6, (4, 6)], ids=["3x3", "2x3"])
def test_scan_in_kernel_equals_reorienting_copies(input_size):
    """scan_in_kernel (raster-order stream, token orders, rearranged conv taps) computes what the reorienting
    path (the release's, checked above) computes: outputs and every parameter gradient, float64, 5 blocks (all
    four directions and the wrap-around), random weights everywhere so that every conv tap and gate matters."""
    kw = dict(depth=5, hidden_size=32, num_heads=2, input_size=input_size, num_classes=10, gla_backend="torch")
    reorienting = create_model("DiG-S/2", **kw).double().eval()
    in_place = create_model("DiG-S/2", **kw, scan_in_kernel=True).double().eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in reorienting.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.2)
    in_place.load_state_dict(reorienting.state_dict())
    rows, cols = reorienting.latent_hw
    x = torch.randn(3, 4, rows, cols, generator=gen, dtype=torch.float64)
    t, y = torch.tensor([1, 500, 999]), torch.tensor([0, 3, 10])
    outs = []
    for model in (reorienting, in_place):
        out = model(x, t, y)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        outs.append(out.detach())
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-10, atol=1e-10)
    assert outs[0].abs().max() > 1
    for (name, a), (_, b) in zip(reorienting.named_parameters(), in_place.named_parameters()):
        # the output norm computes in float32 (as the release's fused norm), so its weight's gradient, a sum over
        # tokens taken in another order, agrees to float32 rounding; everything else to float64's
        tol = 1e-6 if name.endswith("g_norm_swish_gate.weight") else 1e-10
        assert (b.grad - a.grad).abs().max() <= tol * a.grad.abs().max(), name


def test_scan_in_kernel_is_refused_for_u_dig():
    with pytest.raises(ValueError, match="U-DiG"):
        create_model("U-DiG-S/2", depth=4, hidden_size=8, num_heads=2, input_size=6, scan_in_kernel=True)


# -------------------------------------------------------------------------------------------------- init
def test_dw_conv_is_identity_at_init():
    model = create_model("DiG-S/2", **{**TINY, "depth": 3})
    x = torch.randn(2, 64, 4, 4)
    for block in model.blocks:
        assert torch.allclose(block.dw_conv(x), x, atol=1e-6, rtol=0)
        assert torch.count_nonzero(block.dw_conv.weight) == 64 and torch.all(block.dw_conv.bias == 0)


@pytest.mark.parametrize("name", ["DiG-S/2", "DiT-S/2"])
def test_adaln_zero_makes_blocks_identity_and_output_zero(name):
    model = create_model(name, **TINY)
    # Randomise the mixer and MLP so that only the zero adaLN gates can make the block an identity.
    block = model.blocks[0]
    randomize(block.attn, seed=1)
    randomize(block.mlp, seed=2)
    x = torch.randn(2, 16, 64, requires_grad=True)
    c = torch.randn(2, 64)
    args = (x, c, model.grid_size) if name.startswith("DiG") else (x, c)
    y = block(*args)
    assert torch.allclose(y, x, atol=1e-6, rtol=0)
    # The gates still learn: gradient reaches the modulation Linear, none reaches the gated-off branches yet.
    (y * torch.randn_like(y)).sum().backward()
    assert block.adaLN_modulation[-1].weight.grad.abs().sum() > 0
    assert all(p.grad is None or torch.all(p.grad == 0) for p in block.attn.parameters())
    # The whole model predicts exactly zero at init (zero final layer).
    out = model(torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.tensor([1, 2]))
    assert torch.all(out == 0)
    # And it is the gate: non-zero modulation breaks the identity.
    randomize(block.adaLN_modulation, seed=3)
    assert not torch.allclose(block(*args), x, atol=1e-3)


def test_gla_mixer_init_gain():
    mixer = GatedLinearAttention(1024, 8)
    bound = 2 ** -2.5 * math.sqrt(6 / (1024 + 512))  # xavier_uniform bound of q_proj (512 x 1024)
    w = mixer.q_proj.weight
    assert w.abs().max() <= bound and w.abs().max() > 0.95 * bound
    assert torch.all(mixer.gk_proj[1].bias == 0) and torch.all(mixer.g_norm_swish_gate.weight == 1)


def test_u_dig_skipzero_init_is_identity_on_current_tokens():
    model = create_model("U-DiG-S/2", **{**TINY, "depth": 6})
    x, skip = torch.randn(2, 16, 64), torch.randn(2, 16, 64)
    skip_blocks = [b for b in model.blocks if b.skip_linear is not None]
    assert len(skip_blocks) == 2
    for block in skip_blocks:
        assert torch.allclose(block.skip_linear(torch.cat([x, skip], -1)), x, atol=1e-6, rtol=0)
    xavier = create_model("U-DiG-S/2", **{**TINY, "depth": 6}, skip_init="xavier")
    fused = [b for b in xavier.blocks if b.skip_linear is not None][0].skip_linear(torch.cat([x, skip], -1))
    assert not torch.allclose(fused, x, atol=1e-2)


# ------------------------------------------------------------------------------------------- GLA mixer
def test_gla_mixer_matches_float64_recurrence():
    torch.manual_seed(0)
    d, heads, t = 32, 2, 7
    mixer = randomize(GatedLinearAttention(d, heads, backend="torch"), seed=4, std=0.3)
    x = torch.randn(2, t, d, dtype=torch.float64)
    with torch.no_grad():
        got = mixer(x.float()).double()
        mixer.double()  # the reference below runs in float64 and does not call dig.ops
        q, k, v = mixer.q_proj(x), mixer.k_proj(x), mixer.v_proj(x)
        gate = mixer.g_proj(x)
        decay = torch.sigmoid(mixer.gk_proj(x)) ** (1 / 16)  # exp(logsigmoid(z) / 16)
        kd, vd = d // 2 // heads, d // heads
        out = torch.zeros(2, t, d, dtype=torch.float64)
        for b in range(2):
            for h in range(heads):
                ks, vs = slice(h * kd, (h + 1) * kd), slice(h * vd, (h + 1) * vd)
                state = torch.zeros(kd, vd, dtype=torch.float64)
                for i in range(t):
                    state = decay[b, i, ks, None] * state + torch.outer(k[b, i, ks], v[b, i, vs])
                    o = (q[b, i, ks] * kd ** -0.5) @ state
                    o = o / torch.sqrt(o.pow(2).mean() + 1e-6) * mixer.g_norm_swish_gate.weight
                    out[b, i, vs] = o * gate[b, i, vs] * torch.sigmoid(gate[b, i, vs])
        want = mixer.o_proj(out)
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (got - want).abs().max()


def test_dig_forward_torch_backend_deterministic_and_finite():
    model = randomize(create_model("DiG-S/2", **{**TINY, "depth": 4}, gla_backend="torch"), seed=5).eval()
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.tensor([7, 1000])
    with torch.no_grad():
        a, b = model(x, t, y), model(x, t, y)
    assert torch.isfinite(a).all() and a.abs().max() > 0
    assert torch.equal(a, b)


# ------------------------------------------------------------------------------------- CFG, label drop
@pytest.mark.parametrize("name", ["DiG-S/2", "DiT-S/2"])
@pytest.mark.parametrize("guided_channels", [3, None])
def test_forward_with_cfg_equals_manual_combination(name, guided_channels):
    model = randomize(create_model(name, **TINY), seed=6).eval()
    n, scale = 3, 4.0
    x = torch.randn(n, 4, 8, 8)
    t = torch.tensor([5, 250, 999])
    labels, null = torch.tensor([1, 2, 3]), torch.full((n,), 1000)
    with torch.no_grad():
        got = model.forward_with_cfg(torch.cat([x, torch.randn_like(x)]), torch.cat([t, t]),
                                     torch.cat([labels, null]), scale, guided_channels=guided_channels)
        cond, uncond = model(x, t, labels), model(x, t, null)
    k = 4 if guided_channels is None else 3
    guided = uncond[:, :k] + scale * (cond[:, :k] - uncond[:, :k])
    want = torch.cat([torch.cat([guided, cond[:, k:]], 1), torch.cat([guided, uncond[:, k:]], 1)])
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(cond, uncond, atol=1e-4)  # the labels matter, so the check has teeth


def test_label_dropout_rate_in_train_mode_only():
    model = create_model("DiG-S/2", depth=1, hidden_size=16, num_heads=2, input_size=2)
    seen = []
    model.y_embedder.embedding_table.register_forward_hook(lambda m, inp, out: seen.append(inp[0].clone()))
    n = 20_000
    y = torch.randint(0, 1000, (n,))
    x, t = torch.randn(n, 4, 2, 2), torch.randint(0, 1000, (n,))
    torch.manual_seed(7)
    with torch.no_grad():
        model.train()(x, t, y)
        model.eval()(x, t, y)
    train_labels, eval_labels = seen
    dropped = train_labels == 1000
    assert torch.equal(train_labels[~dropped], y[~dropped])
    rate, sigma = dropped.float().mean().item(), math.sqrt(0.1 * 0.9 / n)
    assert abs(rate - 0.1) < 5 * sigma, rate
    assert torch.equal(eval_labels, y)


# ---------------------------------------------------------------------------- positions, resolution
def test_pos_embed_is_fixed_sincos_buffer_outside_state_dict():
    small = create_model("DiG-S/2", **TINY)  # 4 x 4 tokens
    assert "pos_embed" not in small.state_dict() and not small.pos_embed.requires_grad
    big = create_model("DiG-S/2", **{**TINY, "input_size": 16}, pos_embed_base_size=4)  # 8 x 8 tokens
    big.load_state_dict(small.state_dict(), strict=True)
    d = 64
    omega = [10000 ** (-i / (d // 4)) for i in range(d // 4)]
    for model, (rows, cols), step in [(small, (4, 4), 1.0), (big, (8, 8), 0.5)]:
        pe = model.pos_embed[0]
        for r, c in [(0, 0), (1, 2), (rows - 1, cols - 1)]:
            row = pe[r * cols + c]
            # DiT/MAE layout: [sin(x w), cos(x w), sin(y w), cos(y w)] with x the column coordinate.
            want = ([math.sin(c * step * w) for w in omega] + [math.cos(c * step * w) for w in omega]
                    + [math.sin(r * step * w) for w in omega] + [math.cos(r * step * w) for w in omega])
            assert torch.allclose(row, torch.tensor(want), atol=1e-6), (r, c)


def test_non_square_latents_supported():
    for name in ["DiG-S/2", "U-DiG-S/2", "DiT-S/2"]:
        model = randomize(create_model(name, **{**TINY, "depth": 4, "input_size": (8, 12)}), seed=8)
        assert model.grid_size == (4, 6) and model.latent_hw == (8, 12)
        out = model(torch.randn(2, 4, 8, 12), torch.tensor([1, 2]), torch.tensor([3, 4]))
        assert out.shape == (2, 8, 8, 12) and torch.isfinite(out).all()


def output_and_grads(model, x, t, y):
    """The model's output on (x, t, y) and every parameter's gradient of mean(output^2)."""
    torch.manual_seed(12)  # the same label dropout draw for every model
    out = model(x, t, y)
    out.square().mean().backward()
    return out, {n: p.grad for n, p in model.named_parameters()}


def assert_same_output_and_grads(reference, other, rtol=1e-5, atol=1e-7):
    (ref, ref_grads), (out, grads) = reference, other
    torch.testing.assert_close(out, ref, rtol=rtol, atol=atol)
    for n in ref_grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=rtol, atol=atol, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("scope", ["blocks", "stack"])
@pytest.mark.parametrize("name", ["DiG-S/2", "U-DiG-S/2"])
def test_compiled_blocks_equal_eager_with_reorientation_inside(name, scope):
    """compile_blocks on the CPU (inductor, float64): a DiG block reorients its input inside its compiled graph
    (reversed, reversed + transposed: three graphs of the block code), U-DiG between blocks. Outputs and every
    gradient equal the eager model's on a non-square grid (whose transposed grids once made dynamo turn the grid
    into dynamic sizes, which inductor's conv lowering failed on), with one graph per kind of block input.
    scope "stack": compile_block_stack (the whole stack as one region, bench only) computes the same."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    eager = randomize(create_model(name, **{**TINY, "depth": 6, "input_size": (4, 6)}, gla_backend="torch"),
                      seed=11).double().train()
    compiled = copy.deepcopy(eager)
    compiled.compile_blocks() if scope == "blocks" else compiled.compile_block_stack()
    x, t, y = torch.randn(2, 4, 4, 6, dtype=torch.float64), torch.tensor([3, 600]), torch.tensor([1, 2])
    # (the torch GLA backend computes in float32 between the compiled parts: float64 elsewhere, so the two agree
    # to float32 rounding; a misplaced token would be off by O(1))
    assert_same_output_and_grads(*(output_and_grads(m, x, t, y) for m in (eager, compiled)))
    if scope == "stack":
        return
    counters = torch._dynamo.utils.counters
    # at most one graph per kind of block input and part of the block (the torch GLA backend runs between two
    # compiled parts; the part after it only sees whether the grid is transposed, so kinds can share it)
    assert counters["frames"]["ok"] == counters["frames"]["total"], counters["frames"]
    assert counters["stats"]["unique_graphs"] <= 2 * compiled.block_input_kinds, counters["stats"]


@pytest.mark.parametrize("mlp_kernel", [None, False])
def test_mlp_kernel_reaches_every_swiglu(mlp_kernel):
    """model.overrides.mlp_kernel (default on) is what each block's SwiGLU runs with (on the CPU it checkpoints
    either way: the operator needs CUDA or Triton's interpreter; tests/test_swiglu.py)."""
    overrides = {} if mlp_kernel is None else {"mlp_kernel": mlp_kernel}
    model = create_model("DiG-S/2", **{**TINY, "depth": 2}, **overrides)
    assert [block.mlp.kernel for block in model.blocks] == [mlp_kernel is None] * 2
    assert all(block.mlp.recompute_product for block in model.blocks)


def test_mlp_recompute_keeps_the_swiglu_product_out_of_the_saved_activations():
    """mlp_recompute=True: the compiled blocks (inductor on the CPU, float64) no longer save silu(gate) * up
    ([tokens, intermediate]) for the backward, which the same compile without it does; outputs and every gradient
    equal the eager model without recompute, and the recompute adds no graph break."""
    x, t, y = torch.randn(2, 4, 8, 8, dtype=torch.float64), torch.tensor([3, 600]), torch.tensor([1, 2])
    eager = randomize(create_model("DiG-S/2", **{**TINY, "depth": 4}, gla_backend="torch"), seed=11).double().train()
    tokens, inter = 2 * 16, eager.blocks[0].mlp.intermediate_size
    results = {}
    for variant in ("eager", "compiled", "compiled+recompute"):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        model = copy.deepcopy(eager)
        for block in model.blocks:
            block.mlp.recompute_product = variant.endswith("recompute")
        if variant != "eager":
            model.compile_blocks()
        for _ in range(2):  # the second call runs what the first compiled
            saved = []
            torch.manual_seed(12)  # same label dropout draw
            with torch.autograd.graph.saved_tensors_hooks(lambda z: saved.append(tuple(z.shape)) or z, lambda z: z):
                out = model(x, t, y)
            model.zero_grad(set_to_none=True)
            out.square().mean().backward()
        products = sum(shape == (tokens, inter) for shape in saved)
        results[variant] = (out, [p.grad for p in model.parameters()], products,
                            dict(torch._dynamo.utils.counters["stats"]), dict(torch._dynamo.utils.counters["frames"]))
    ref_out, ref_grads = results["eager"][:2]
    for variant in ("compiled", "compiled+recompute"):
        out, grads = results[variant][:2]
        torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-7)
        for g, ref in zip(grads, ref_grads):
            torch.testing.assert_close(g, ref, rtol=1e-5, atol=1e-7)
    assert results["compiled"][2] == 4  # one product per block saved: the check looks at something
    assert results["compiled+recompute"][2] == 0
    stats, frames = results["compiled+recompute"][3:]
    assert frames["ok"] == frames["total"] and stats["unique_graphs"] == results["compiled"][3]["unique_graphs"]


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_packed_projections_compute_the_separate_projections(compiled):
    """packed_projections (the default: q, k, v and the output gate as one GEMM whose output goes whole to the GLA
    and norm-gate): the same outputs and every parameter's gradient as four separate Linears, in float64 on the
    CPU, eager and compiled; the state dict keeps the release's names."""
    x, t, y = torch.randn(2, 4, 8, 8, dtype=torch.float64), torch.tensor([3, 600]), torch.tensor([1, 2])
    separate = randomize(create_model("DiG-S/2", **{**TINY, "depth": 4}, gla_backend="torch",
                                      packed_projections=False), seed=5).double()
    packed = create_model("DiG-S/2", **{**TINY, "depth": 4}, gla_backend="torch").double()
    assert packed.blocks[0].attn.packed_projections and not separate.blocks[0].attn.packed_projections
    assert packed.state_dict().keys() == separate.state_dict().keys()
    packed.load_state_dict(separate.state_dict())
    results = []
    for model in (separate, packed):
        torch._dynamo.reset()
        if compiled:
            model.compile_blocks()
        results.append(output_and_grads(model, x, t, y))
    for n, grad in results[0][1].items():  # the projections' gradients are there to compare
        assert "attn" not in n or grad.abs().max() > 0, n
    assert_same_output_and_grads(*results)


def test_retired_override_is_named_and_dropped_from_saved_kwargs():
    """A retired runtime option (dw_conv_kernel, fused_projections) is refused with what replaced it; a checkpoint's
    saved kwargs that still carry it build the model without it."""
    from dig.models import without_retired

    with pytest.raises(ValueError, match="retired override.*dw_conv_kernel.*dw_conv_flipped_grad"):
        create_model("DiG-S/2", **TINY, dw_conv_kernel=True)
    with pytest.raises(ValueError, match="retired override.*fused_projections.*packed_projections"):
        create_model("DiG-S/2", **TINY, fused_projections=False)
    saved = {**TINY, "dw_conv_kernel": False, "fused_projections": True, "depth": 2}
    assert without_retired(saved) == {**TINY, "depth": 2}
    assert len(create_model("DiG-S/2", **without_retired(saved)).blocks) == 2


def test_block_stack_compile_refuses_checkpointed_blocks():
    """Dynamo would leave checkpointed blocks eager inside the one compiled region: a clear error, not a slow model."""
    model = create_model("DiG-S/2", **TINY, grad_checkpointing=True)
    with pytest.raises(ValueError, match="compile_block_stack with grad_checkpointing"):
        model.compile_block_stack()


def test_grad_checkpointing_gives_same_gradients():
    """Per-block checkpointing, also with the SwiGLU's own recompute nested inside it (mlp_recompute)."""
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 600]), torch.tensor([1, 2])
    grads = []
    for ckpt, recompute in ((False, False), (True, False), (True, True), (False, True)):
        model = randomize(create_model("DiG-S/2", **TINY, grad_checkpointing=ckpt, mlp_recompute=recompute),
                          seed=9).train()
        torch.manual_seed(10)  # same label dropout draw
        model(x, t, y).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    for other in grads[1:]:
        assert torch.allclose(grads[0], other, atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ registry
def test_registry_names_and_errors():
    names = list_models()
    assert names == sorted(names) and len(names) == 36
    assert {"DiG-XL/2", "U-DiG-S/2", "DiT-B/8"} <= set(names)
    with pytest.raises(ValueError) as err:
        create_model("DiG-XXL/2")
    assert ", ".join(names) in str(err.value)
    with pytest.raises(ValueError, match="unknown override.*'depht'"):
        create_model("DiG-S/2", depht=3)
    with pytest.raises(ValueError, match="gla_backend"):
        create_model("DiT-S/2", gla_backend="torch")
    with pytest.raises(ValueError, match="unknown gla_backend 'trition'"):
        create_model("DiG-S/2", depth=1, gla_backend="trition")
    with pytest.raises(ValueError, match="skip_init"):
        create_model("DiG-S/2", skip_init="zero")
    with pytest.raises(ValueError, match="patch_size"):
        create_model("DiG-S/2", patch_size=4)
    with pytest.raises(ValueError, match="depth must be even"):
        create_model("U-DiG-S/2", **{**TINY, "depth": 3})
