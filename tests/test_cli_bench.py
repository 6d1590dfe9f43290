"""`dig bench` dispatches to the checkout's bench/ scripts; the trainer-overhead script runs end to end on CPU."""
import json
import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_trainer_overhead_quick_runs_from_any_directory(tmp_path):
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=os.path.join(REPO, ".torch_extensions"))
    out = subprocess.run([sys.executable, "-m", "dig.cli", "bench", "trainer-overhead", "--quick",
                          "--out", str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = dict(re.findall(r"^(bare model step|dig train step \(ZeRO-3\))\s+([\d.]+)", out.stdout, re.M))
    assert set(rows) == {"bare model step", "dig train step (ZeRO-3)"} and all(float(v) > 0 for v in rows.values())
    written = list(tmp_path.glob("trainer_overhead_*_zero3.json"))  # named by model, resolution and stage
    assert len(written) == 1 and json.loads(written[0].read_text())["rows"], written


def test_bench_rejects_unknown_suite():
    out = subprocess.run([sys.executable, "-m", "dig.cli", "bench", "no-such-suite"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2 and "invalid choice" in out.stderr


def test_bench_train_quick_runs_the_launcher_path_and_reads_its_metrics(tmp_path):
    """`dig bench train --quick`: the real `python -m launch.train` → torchrun → `dig train` on CPU, metrics
    through the trainer's JSON-lines tracker (no MLflow), a checkpoint whose blocking time is logged, and a
    summary whose throughput agrees with the run's own metric records."""
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=os.path.join(REPO, ".torch_extensions"))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    out = subprocess.run([sys.executable, "-m", "dig.cli", "bench", "train", "--quick", "--out", str(tmp_path)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, (out.stdout[-2000:], out.stderr[-3000:])
    result = json.loads((tmp_path / "bench_train.json").read_text())
    (row,) = result["rows"]
    assert row["rc"] == 0 and row["gpus"] == 1 and row["checkpoint_block_s"] > 0, row
    records = [json.loads(line) for line in (tmp_path / row["metrics_file"]).read_text().splitlines()]
    steady = [r["img_per_sec"] for r in records if r.get("step", 0) > result["warmup"] and "img_per_sec" in r]
    assert steady and min(steady) <= row["img_per_s_per_gpu"] <= max(steady), (steady, row)
    assert any("checkpoint_block_s" in r for r in records) and any("checkpoint" in r for r in records)


def test_bench_gla_kernels_quick_times_forward_and_backward_against_the_byte_floor(tmp_path):
    out = subprocess.run([sys.executable, "-m", "dig.cli", "bench", "gla-kernels", "--quick", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
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
