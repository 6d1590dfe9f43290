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
