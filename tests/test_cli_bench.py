"""`dig bench` dispatches to the checkout's bench/ scripts; the trainer-overhead script runs end to end on CPU."""
import json
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def dig_bench(*args: str, cwd=None, timeout: float = 600) -> subprocess.CompletedProcess:
    """`dig bench ARGS…` in a fresh process, outside any torchrun rendezvous of the caller."""
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=os.path.join(REPO, ".torch_extensions"))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return subprocess.run([sys.executable, "-m", "dig.cli", "bench", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_bench_trainer_overhead_quick_runs_from_any_directory(tmp_path):
    out = dig_bench("trainer-overhead", "--quick", "--out", str(tmp_path), cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = dict(re.findall(r"^(bare model step|dig train step \(ZeRO-3\))\s+([\d.]+)", out.stdout, re.M))
    assert set(rows) == {"bare model step", "dig train step (ZeRO-3)"} and all(float(v) > 0 for v in rows.values())
    written = list(tmp_path.glob("trainer_overhead_*_zero3.json"))  # named by model, resolution and stage
    assert len(written) == 1 and json.loads(written[0].read_text())["rows"], written


def test_bench_saved_activations_counts_what_the_compiled_model_keeps(tmp_path):
    """`dig bench saved-activations` (bench/memory_breakdown.py) on CPU, tiny DiG compiled: with mlp_recompute (the
    default) the count is lower by exactly the SwiGLU product, one bf16 [tokens, intermediate] tensor per block."""
    tiny = "DiG-S/2:depth=2,hidden_size=64,num_heads=2,gla_backend=torch"
    out = dig_bench("saved-activations", "--run", tiny + ",mlp_recompute=false", "--run", tiny, "--resolution", "64",
                    "--batch", "2", "--json", str(tmp_path / "saved.json"), cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    runs = json.loads((tmp_path / "saved.json").read_text())["runs"]
    plain, recompute = (runs[k]["bytes_per_token_per_block"] for k in (tiny + ",mlp_recompute=false", tiny))
    intermediate = 256  # SwiGLU width of hidden 64: 256 * ceil(int(64 * 4 * 2/3) / 256)
    assert plain - recompute == intermediate * 2, (plain, recompute)
    assert "vs first" in out.stdout


def test_bench_rejects_unknown_suite():
    out = dig_bench("no-such-suite", timeout=120)
    assert out.returncode == 2 and "invalid choice" in out.stderr


def test_bench_train_quick_runs_the_launcher_path_and_reads_its_metrics(tmp_path):
    """`dig bench train --quick`: the real `python -m launch.train` → torchrun → `dig train` on CPU, metrics
    through the trainer's JSON-lines tracker (no MLflow), a checkpoint whose blocking time is logged, and a
    summary whose throughput agrees with the run's own metric records."""
    out = dig_bench("train", "--quick", "--out", str(tmp_path), cwd=tmp_path)
    assert out.returncode == 0, (out.stdout[-2000:], out.stderr[-3000:])
    result = json.loads((tmp_path / "bench_train.json").read_text())
    (row,) = result["rows"]
    assert row["rc"] == 0 and row["gpus"] == 1 and row["checkpoint_block_s"] > 0, row
    records = [json.loads(line) for line in (tmp_path / row["metrics_file"]).read_text().splitlines()]
    steady = [r["img_per_sec"] for r in records if r.get("step", 0) > result["warmup"] and "img_per_sec" in r]
    assert steady and min(steady) <= row["img_per_s_per_gpu"] <= max(steady), (steady, row)
    assert any("checkpoint_block_s" in r for r in records) and any("checkpoint" in r for r in records)


def test_bench_gla_kernels_quick_times_forward_and_backward_against_the_byte_floor(tmp_path):
    out = dig_bench("gla-kernels", "--quick", "--out", str(tmp_path), timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((tmp_path / "gla_kernels.json").read_text())
    assert [(r["res"], r["batch"]) for r in report["rows"]] == [(64, 2), (128, 1)]
    for row in report["rows"]:
        tokens, batch = (row["res"] // 16) ** 2, row["batch"]
        # fp32 on CPU: forward reads q, k, g (K = 32 each), v (V = 64) and writes o; backward reads those and do,
        # and writes dq, dk, dg, dv; 18 heads
        floor_fwd_s = (3 * 32 + 64 + 64) * 4 * batch * tokens * 18 / (report["copy_gbs"] * 1e9)
        floor_bwd_s = (2 * (3 * 32 + 64) + 64) * 4 * batch * tokens * 18 / (report["copy_gbs"] * 1e9)
        assert row["torch_fwd_ms"] > 0 and row["torch_bwd_ms"] > 0 and row["sdpa_fwd_ms"] > 0
        for direction, floor_s in (("fwd", floor_fwd_s), ("bwd", floor_bwd_s)):
            expected = row[f"torch_{direction}_ms"] / (floor_s * 1e3)
            assert abs(row[f"torch_{direction}_floor_x"] - expected) <= 1e-6 * expected, (direction, row)
    assert "GLA fwd" in out.stdout and "GLA bwd" in out.stdout
def test_bench_pipeline_encoder_settings_side_by_side_on_cpu(tmp_path):
    """`dig bench pipeline --only encoder --settings …` (what --sweep runs on the GPU, minus the compiles): one
    row per setting with its speed and its distance from the strict fp32 encode of the same images."""
    out = dig_bench("pipeline", "--only", "encoder", "--vae", "config:tiny", "--device", "cpu", "--images", "5",
                    "--resolution", "32", "--batch", "2", "--repeat", "1", "--settings", "legacy-bf16,fp32,bf16+cl@4",
                    "--out", str(tmp_path), cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((tmp_path / "encoder_bench.json").read_text())
    rows = {r["setting"]: r for r in result["rows"]}
    assert list(rows) == ["legacy-bf16@2", "fp32@2", "bf16+cl@4"]
    assert (rows["bf16+cl@4"]["batch"], rows["bf16+cl@4"]["memory_format"]) == (4, "channels_last")
    for row in rows.values():
        assert row["images"] == 5 and row["source_img_per_s"] > 0
        assert abs(row["encodes_per_s"] - 2 * row["source_img_per_s"]) < 0.02 * row["encodes_per_s"]
        assert f"| {row['setting']} |" in out.stdout  # the printed table
    ref = result["reference"]
    assert 0 < ref["storage_rounding_mean"] <= ref["mean_max_abs"] * 2 ** -11  # fp16: half an ulp at most
    # fp32 differs from the reference by fp32 noise, then by the fp16 storage (at most half an ulp, plus one ulp
    # where the noise crosses a rounding boundary); bf16 arithmetic by bf16 noise (8 significant bits)
    assert rows["fp32@2"]["mean_max_abs_diff"] <= ref["mean_max_abs"] * 3 * 2 ** -11
    for name in ("legacy-bf16@2", "bf16+cl@4"):
        assert rows[name]["mean_max_abs_diff"] <= 0.05 * ref["mean_max_abs"], rows[name]


def test_bench_pipeline_rejects_a_bad_encoder_setting():
    out = dig_bench("pipeline", "--only", "encoder", "--settings", "bf16+nhwc", timeout=120)
    assert out.returncode == 2 and "bad encoder setting 'bf16+nhwc'" in out.stderr, out.stderr[-2000:]


def test_bench_pipeline_setting_names():
    from bench.bench_pipeline import SWEEP, parse_setting

    s = parse_setting("bf16+cl+compile@128", 64)
    assert (s.precision, s.memory_format, s.compile, s.compile_mode, s.batch) == (
        "bf16", "channels_last", True, "default", 128)
    s = parse_setting("fp16+autotune", 64)
    assert (s.name, s.memory_format, s.compile, s.compile_mode) == (
        "fp16+autotune@64", "contiguous", True, "max-autotune-no-cudagraphs")
    assert parse_setting("legacy-bf16", 32).legacy and not parse_setting("bf16", 32).legacy
    s = parse_setting("bf16+cl+compile+freeze+allalgos", 64)
    assert (s.freeze, s.all_algorithms, s.compile) == (True, True, True)
    s = parse_setting("bf16+allalgos", 64)
    assert (s.freeze, s.all_algorithms, s.compile) == (False, True, False)
    names = [parse_setting(spec, 64).name for spec in SWEEP]
    assert len(set(names)) == len(names) and "legacy-bf16@64" in names and "bf16+cl+compile@64" in names
    for bad in ("bf16+cl+compile+autotune", "legacy-bf16+cl", "bf16@0", "int8", "bf16+cl@", "bf16+cl+freeze",
                "legacy-bf16+allalgos"):
        with pytest.raises(ValueError, match="bad encoder setting"):
            parse_setting(bad, 64)


def _brute_force_max_batch(fits, cap):
    return max((b for b in range(1, cap + 1) if fits(b)), default=0)


@pytest.mark.parametrize("case", ["linear", "convex", "rounded", "first_too_big", "none_fits", "capped"])
def test_bench_memory_search_finds_the_brute_force_edge(case):
    """`search_max_batch` against a brute-force scan of the same memory model: exact with tolerance 0, within
    2% (and in at most its default 12 trials) with the default tolerance."""
    from bench.bench_memory import search_max_batch

    gib = 2 ** 30
    state, per_image, capacity, cap = 13 * gib, 0.33 * gib, 139 * gib, 1024
    if case == "convex":  # the line through two small batches overshoots the edge
        def peak(b): return state + per_image * b + 0.002 * gib * b * b
    elif case == "rounded":  # the allocator's 2 MiB rounding
        def peak(b): return -(-(state + per_image * b) // 2 ** 21) * 2 ** 21
    elif case == "first_too_big":  # 1024 px: 32 images do not fit
        def peak(b): return state + 16 * per_image * b
    elif case == "none_fits":
        def peak(b): return capacity + b
    elif case == "capped":  # activation checkpointing at 256 px: the cap comes first
        def peak(b): return state + 0.04 * gib * b
    else:
        def peak(b): return state + per_image * b

    calls = []

    def trial(b):
        calls.append(b)
        assert 1 <= b <= cap, b
        return peak(b) if peak(b) <= capacity else None

    expected = _brute_force_max_batch(lambda b: peak(b) <= capacity, cap)
    exact = search_max_batch(trial, capacity, cap, tol=0.0, max_trials=40)
    assert exact["max_batch"] == expected, (exact, expected)
    assert exact["capped"] == (expected == cap)
    if 0 < expected < cap:
        assert exact["oom_batch"] == expected + 1
    calls.clear()
    found = search_max_batch(trial, capacity, cap)  # the defaults the GPU run uses
    assert len(calls) <= (6 if case in ("linear", "rounded", "capped") else 12), calls  # GPU time: few trials
    assert [t["batch"] for t in found["trials"]] == calls
    assert found["max_batch"] <= expected and expected - found["max_batch"] <= max(1, int(0.02 * expected))
    if 0 < expected < cap:
        assert found["oom_batch"] - found["max_batch"] <= max(1, int(0.02 * found["max_batch"]))


def test_bench_memory_quick_measures_the_recipe_state_and_searches(tmp_path):
    """`dig bench memory --quick`: the real trainer step of the recipe config (tiny DiG-S/2, CPU) with and without
    activation checkpointing. Its training state, counted from the trainer's own tensors, must be what the
    recipe keeps: fp32 weights, fp32 gradients, AdamW's two fp32 moments and the fp32 EMA = 4 + 4 + 8 + 4 bytes per
    parameter (parameter count from the model registry); and the batch search must be consistent with its trials
    against the fake limit."""
    from bench.bench_memory import TINY

    from dig.models import create_model

    out = dig_bench("memory", "--quick", "--out", str(tmp_path), cwd=tmp_path, timeout=300)
    assert out.returncode == 0, (out.stdout[-2000:], out.stderr[-3000:])
    result = json.loads((tmp_path / "bench_memory.json").read_text())
    rows = {r["checkpointing"]: r for r in result["rows"]}
    assert set(rows) == {False, True} and not result["state_mismatches"]
    n = sum(p.numel() for p in create_model("DiG-S/2", input_size=8, **TINY).parameters())
    for row in rows.values():
        assert row["params"] == n
        assert (row["state"]["weights"], row["state"]["grads"], row["state"]["adam_moments"], row["state"]["ema"]) \
            == (4 * n, 4 * n, 8 * n, 4 * n), row["state"]
        fit = [t["batch"] for t in row["trials"] if "peak_allocated" in t]
        oom = [t["batch"] for t in row["trials"] if "peak_allocated" not in t]
        assert row["max_batch"] == max(fit) and (not oom or max(fit) < min(oom))  # monotone, as memory is
        assert all(t["peak_allocated"] <= row["capacity"] for t in row["trials"] if "peak_allocated" in t)
        if row["capped"]:
            assert row["max_batch"] == row["cap"] == 64
        else:
            assert row["oom_batch"] == min(oom) and row["oom_batch"] - row["max_batch"] <= 1
    # the fake limit lets ~9 images through without checkpointing; checkpointing saves fewer activations per image
    assert 8 <= rows[False]["max_batch"] <= 10, rows[False]["trials"]
    assert rows[True]["bytes_per_image"] < rows[False]["bytes_per_image"]
    assert rows[True]["max_batch"] > rows[False]["max_batch"]
    assert "| model | res | tokens/img | params (M) |" in out.stdout and "| DiG-S/2 | 64 | 16 |" in out.stdout
    assert "training state = 20 B/param" in out.stdout


def test_bench_memory_usage_errors_are_one_line():
    for args, message in ((["--resolutions", "250"], "--resolutions: multiples of 16 px"),
                          (["--recipe-check", "XL@256"], "--recipe-check: MODEL@RES"),
                          (["--models", "DiG-XXL/2"], "unknown model(s) ['DiG-XXL/2']")):
        out = dig_bench("memory", *args, timeout=120)
        assert out.returncode == 2 and message in out.stderr, (args, out.stderr[-2000:])


def test_model_options_and_cases_parse_or_fail_clearly():
    sys.path.insert(0, REPO)
    from bench.common import model_options
    from bench.run_all import parse_case

    assert model_options("triton+scan+mlp_recompute=false+depth=4+norm=rms", first="gla_backend") == {
        "gla_backend": "triton", "scan_in_kernel": True, "mlp_recompute": False, "depth": 4, "norm": "rms"}
    assert model_options("mlp_recompute=TRUE") == {"mlp_recompute": True}
    with pytest.raises(SystemExit, match="neither 'scan' nor KEY=VALUE"):
        model_options("triton+recompute", first="gla_backend")
    assert parse_case("256x32") == (256, 32, False) and parse_case("4096x1+ckpt") == (4096, 1, True)
    for bad in ("256", "256x", "256x32+fast"):
        with pytest.raises(SystemExit, match="--cases"):
            parse_case(bad)


def test_gla_launch_option_sets_parse_or_fail_clearly():
    """bench.tune_gla_launch's option sets: warps, chunk, register cap, stages, prefetch, and a dots mode (t/m/b as
    DIG_GLA_DOTS_16BIT's tf32/mixed/bf16); without a mode the module's own applies (no precision set)."""
    sys.path.insert(0, REPO)
    from bench.tune_gla_launch import parse_config, parse_layout

    assert parse_config("auto") is None
    assert parse_config("auto@packed") is None and parse_config("w1@packed") == {"num_warps": 1}
    assert parse_layout("w1@packed") == ("w1", True) and parse_layout("w1") == ("w1", False)
    with pytest.raises(SystemExit, match="layout suffix"):
        parse_layout("w1@strided")
    assert parse_config("w4") == {"num_warps": 4}
    assert parse_config("w4r96s2pm") == {"num_warps": 4, "maxnreg": 96, "num_stages": 2, "PREFETCH": True,
                                         "PRECISION": "tf32", "FAST_PRECISION": "bf16"}
    assert parse_config("w2t") == {"num_warps": 2, "PRECISION": "tf32", "FAST_PRECISION": "tf32"}
    assert parse_config("w2b") == {"num_warps": 2, "PRECISION": "bf16", "FAST_PRECISION": "bf16"}
    assert parse_config("w2c32r200") == {"num_warps": 2, "BT": 32, "maxnreg": 200}
    for bad in ("w4x", "4", "w4bm", "w4mp", "w2c24", "w2c8", "w2r96c32"):
        with pytest.raises(SystemExit, match="bad option set"):
            parse_config(bad)


def test_run_all_ratios_pair_each_batch_with_its_own_dit_row(tmp_path):
    """`dig bench gpu --quick` (bench.run_all) on CPU with two batches at one resolution and a DiG override row:
    every DiG/DiT ratio is the DiG row's img/s over the DiT row of the same resolution, batch and variant."""
    out = dig_bench("gpu", "--quick", "--sections", "model", "--variants", "eager", "--cases", "64x1,64x2",
                    "--gla-backends", "torch,torch+mlp_recompute=false", "--repeat", "1", "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert "--cases 64x1,64x2 --gla-backends torch,torch+mlp_recompute=false" in results["command"]
    rows = {(r["model"], r["gla"], r["batch"]): r for r in results["model"]}
    assert len(rows) == 6 and not any("error" in r for r in rows.values()), results["model"]
    ratios = {(r["gla"], r["batch"]): r["DiG/DiT img/s"] for r in results["ratios"]}
    assert set(ratios) == {(g, b) for g in ("torch", "torch+mlp_recompute=false") for b in (1, 2)}
    for (gla, batch), ratio in ratios.items():
        want = rows[("DiG-S/2", gla, batch)]["img_s"] / rows[("DiT-S/2", "", batch)]["img_s"]
        assert ratio == pytest.approx(want, rel=1e-12)


def test_bench_ab_step_times_steps_in_rotating_rounds(tmp_path):
    """`dig bench ab-step --quick` on CPU: two tiny DiG steps, every round times each once, the first step's ratio
    to itself is 1 and the other's is the median of its per-round ratios (recomputed here from the raw times)."""
    import statistics

    out = dig_bench("ab-step", "--quick", "--rounds", "4", "--out", str(tmp_path), timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((tmp_path / "ab_step.json").read_text())
    base, other = report["rows"]
    times = report["times_ms"]
    assert [len(times[r["step"]]) for r in (base, other)] == [4, 4]
    assert base[f"ms / {base['step']}"] == 1.0
    ratios = [a / b for a, b in zip(times[other["step"]], times[base["step"]])]
    assert other[f"ms / {base['step']}"] == pytest.approx(statistics.median(ratios))
    assert other["p10"] <= other[f"ms / {base['step']}"] <= other["p90"]
    assert other["ms"] == pytest.approx(statistics.median(times[other["step"]]))


def test_bench_ab_step_needs_two_different_steps():
    for steps in ("DiG-S/2", "DiG-S/2,DiG-S/2"):
        out = dig_bench("ab-step", "--steps", steps, "--variant", "eager", timeout=120)
        assert out.returncode != 0 and "--steps:" in out.stderr, out.stderr[-500:]


def test_bench_ab_train_times_trainer_steps_in_rotating_rounds(tmp_path):
    """`dig bench ab-train --quick` on CPU: two real Trainers in one process, the same run twice told apart by
    --set-run; each trainer built with its own settings, every round times each once, ratios recomputed here."""
    import statistics

    quick = "DiG-S/2+depth=2+hidden_size=64+num_heads=2"
    out = dig_bench("ab-train", "--quick", "--runs", f"{quick},{quick}", "--set-run",
                    "2:model.overrides.mlp_recompute=false", "--rounds", "3", "--steps-per-round", "1", "--out",
                    str(tmp_path), cwd=tmp_path, timeout=400)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((tmp_path / "ab_train.json").read_text())
    base, other = report["rows"]
    assert (base["run"], other["run"]) == (f"1:{quick}", f"2:{quick}")
    assert "mlp_recompute" not in base["model_kwargs"] and other["model_kwargs"]["mlp_recompute"] is False
    assert base["model_kwargs"]["depth"] == other["model_kwargs"]["depth"] == 2
    times = report["times_ms"]
    assert [len(times[r["run"]]) for r in (base, other)] == [3, 3] and min(times[base["run"]]) > 0
    assert base[f"ms / {base['run']}"] == 1.0
    ratios = [a / b for a, b in zip(times[other["run"]], times[base["run"]])]
    assert other[f"ms / {base['run']}"] == pytest.approx(statistics.median(ratios))
    assert other["img_s"] == pytest.approx(2 / (statistics.median(times[other["run"]]) * 1e-3))


@pytest.mark.parametrize("args, message", [(["--runs", "DiG-S/2,DiG-S/2"], "the same run twice"),
                                           (["--runs", "DiG-S/2"], "at least two runs"),
                                           (["--runs", "DiG-S/2,DiT-S/2", "--set-run", "3:steps=1"], "--set-run")],
                         ids=["same-run", "one-run", "bad-set-run"])
def test_bench_ab_train_refuses_runs_it_cannot_compare(args, message):
    out = dig_bench("ab-train", *args, timeout=120)
    assert out.returncode != 0 and message in out.stderr, out.stderr[-500:]


def test_bench_dwconv_quick_times_both_backwards_against_the_byte_floor(tmp_path):
    out = dig_bench("dwconv", "--quick", "--out", str(tmp_path), timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    (row,) = json.loads((tmp_path / "dwconv.json").read_text())["rows"]
    nbytes = 2 * 4 * 4 * 1152 * 4  # the quick case: [2, 4, 4, 1152] float32
    assert row["floor_fwd_ms"] == pytest.approx(2 * nbytes / 3.3e12 * 1e3)
    for name in ("conv2d", "flipped"):
        assert row[f"{name}_fwd_bwd_ms"] > 0 and row[f"{name}_max_err"] < 1e-5, row
    assert "depthwise conv 3x3 forward" in out.stdout


def test_rotating_rounds_rotate_the_order_and_pair_ratios_by_round():
    """bench.common.rotating_rounds: round r starts with block r mod n; paired_ratios pairs rounds by index."""
    from bench.common import paired_ratios, rotating_rounds

    order = []
    clock = iter(range(100))

    def block(label):
        def run():
            order.append(label)
            return float(next(clock))
        return run

    times = rotating_rounds({"a": block("a"), "b": block("b"), "c": block("c")}, rounds=4)
    assert order == ["a", "b", "c", "b", "c", "a", "c", "a", "b", "a", "b", "c"]
    assert times == {"a": [0.0, 5.0, 7.0, 9.0], "b": [1.0, 3.0, 8.0, 10.0], "c": [2.0, 4.0, 6.0, 11.0]}
    stats = paired_ratios({"base": [10.0, 20.0, 40.0], "x": [11.0, 18.0, 44.0]}, "base")
    assert stats["base"] == {"ms": 20.0, "ratio": 1.0, "p10": 1.0, "p90": 1.0}
    # per-round ratios 1.1, 0.9, 1.1: median 1.1; p10 between 0.9 and 1.1 at 0.2 of the way, p90 1.1
    assert stats["x"]["ms"] == 18.0 and stats["x"]["ratio"] == pytest.approx(1.1)
    assert stats["x"]["p10"] == pytest.approx(0.94) and stats["x"]["p90"] == pytest.approx(1.1)
