"""End to end on CPU: `dig sample … --out X.npz` (interrupted in one process, finished by two torchrun processes
over gloo: the same images as one uninterrupted run), `dig eval` with random-weight Inception printing the table
and logging to a training run on a real `mlflow server`, and FID during a two-rank `dig train` equal
to what `dig sample` + `dig eval` give for the same checkpoint."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from mlflow_server import mlflow_tracking_server  # noqa: F401  (fixture)
from servers import free_port
from test_inference import make_export

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "train", "tiny-cpu.yaml")


def clean_env() -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO, "DS_ACCELERATOR": "cpu",
           "TORCH_EXTENSIONS_DIR": os.path.join(REPO, ".torch_extensions")}
    for k in ("MLFLOW_TRACKING_URI", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
              "DIG_INCEPTION"):
        env.pop(k, None)
    return env


def reference_batch(path: str, n: int, side: int, seed: int = 0) -> str:
    """Smooth random pictures as a stand-in reference batch (arr_0 uint8 NHWC, as ADM's)."""
    rng = np.random.default_rng(seed)
    low = rng.uniform(0, 255, size=(n, 4, 4, 3))
    images = np.kron(low, np.ones((1, side // 4, side // 4, 1))).astype(np.uint8)
    np.savez(path, images)
    return path


def test_sample_npz_resumes_on_any_process_count_then_eval_logs_to_mlflow(tmp_path, monkeypatch, capsys,
                                                                          mlflow_tracking_server):
    import dig.inference.sample_npz as sample_npz
    from dig.cli import main

    export = make_export(str(tmp_path / "export"))
    common = ["--num-samples", "5", "--sampling-steps", "3", "--cfg-scale", "1.5", "--seed", "2"]
    straight, resumed = str(tmp_path / "straight.npz"), str(tmp_path / "resumed.npz")
    assert main(["sample", export, "--out", straight, "--batch-size", "4", *common]) == 0

    # Interrupted after its first chunk of 3 …
    real, calls = sample_npz.sample_images, []

    def interrupted(*args, **kwargs):
        calls.append(args[4])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(sample_npz, "sample_images", interrupted)
    with pytest.raises(KeyboardInterrupt):
        sample_npz.sample_to_npz(export, resumed, 5, batch_size=3, num_steps=3, cfg_scale=1.5, seed=2,
                                 progress=False)
    monkeypatch.undo()
    assert calls[0] == [0, 1, 2] and not os.path.exists(resumed)
    assert sorted(os.listdir(resumed + ".parts")) == ["chunk_0000000.npz", "plan.json"]
    # … other settings do not mix into it …
    assert main(["sample", export, "--out", resumed, "--batch-size", "3", *common[:-1], "3"]) == 2
    # … and two processes finish it.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "-m", "dig.cli", "sample", export, "--out", resumed, "--batch-size", "3",
           *common]
    done = subprocess.run(cmd, env=clean_env(), cwd=str(tmp_path), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming: 3 of 5 samples already" in done.stderr
    assert "sampling 5 images on 2 process(es): 5/5 img (100.0%)" in done.stderr  # progress lines in a log
    assert not os.path.exists(resumed + ".parts")
    a, b = np.load(straight), np.load(resumed)
    assert a["arr_0"].shape == (5, 32, 32, 3) and a["arr_0"].dtype == np.uint8
    np.testing.assert_array_equal(a["arr_1"], b["arr_1"])
    assert np.abs(a["arr_0"].astype(int) - b["arr_0"]).max() <= 1  # batch shapes differ: summation order only
    assert main(["sample", export, "--out", resumed, *common]) == 2  # never overwrites a finished set

    # dig eval: a table, a JSON, and the numbers in the training run's MLflow run (found via its run directory)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_tracking_server.uri)
    run_id = client.create_run(client.create_experiment("eval-test")).info.run_id
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "tracking.json").write_text(json.dumps({"uri": mlflow_tracking_server.uri, "run_id": run_id}))
    ref = reference_batch(str(tmp_path / "ref.npz"), 6, 32)
    capsys.readouterr()
    assert main(["eval", "--samples", straight, "--ref", ref, "--random-inception", "--json", str(tmp_path / "m.json"),
                 "--mlflow-run", str(run_dir), "--step", "7", "--batch-size", "8"]) == 0
    printed = capsys.readouterr().out
    for name in ("Inception Score", "FID", "sFID", "Precision", "Recall"):
        assert name in printed
    metrics = json.loads((tmp_path / "m.json").read_text())
    logged = client.get_run(run_id).data.metrics
    assert {f"eval/{k}": v for k, v in metrics.items()} == pytest.approx(logged)
    assert metrics["fid"] > 0 and 0 <= metrics["precision"] <= 1 and 0 <= metrics["recall"] <= 1
    assert [m.step for m in client.get_metric_history(run_id, "eval/fid")] == [7]

    # without weights: a clear error
    assert main(["eval", "--samples", straight, "--ref", ref]) == 2


def test_fid_during_training_equals_dig_sample_plus_dig_eval(tmp_path):
    """`dig train` on two ranks with tracking.eval_every logs eval/* to MLflow at those steps; the step-4 numbers
    are what `dig sample` + `dig eval` in one process give from that step's checkpoint (same seeds, same random
    Inception): the ranks' shares are gathered in index order, nothing lost or doubled."""
    from mlflow.tracking import MlflowClient

    from dig.cli import main
    from dig.data.synthetic import write_synthetic_dataset

    write_synthetic_dataset(str(tmp_path / "latents"), num_shards=2, samples_per_shard=4, latent_size=8, channels=4,
                            num_classes=10)
    ref = reference_batch(str(tmp_path / "ref.npz"), 5, 64)
    evals = ["tracking.eval_every=2", "tracking.eval.num_samples=4", "tracking.eval.batch_size=2",
             "tracking.eval.num_steps=2", "tracking.eval.cfg_scale=1.5", f"tracking.eval.ref={ref}",
             "tracking.eval.random_inception=true"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "-m", "dig.cli", "train", "--config", TINY, "run.dir=run",
           f"data.path={tmp_path / 'latents'}", "tracking.sample_every=0", "data.global_batch_size=4",
           "data.micro_batch_size=2", "steps=4",
           "checkpoint.every=2", "checkpoint.keep_last=2", *evals]
    done = subprocess.run(cmd, cwd=str(tmp_path), env=clean_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = json.loads((tmp_path / "run" / "tracking.json").read_text())["run_id"]
    history = client.get_metric_history(run_id, "eval/fid")
    assert [m.step for m in history] == [2, 4]

    ckpt = str(tmp_path / "run" / "checkpoints" / "step_000000004")
    samples = str(tmp_path / "step4.npz")
    assert main(["sample", ckpt, "--out", samples, "--num-samples", "4", "--batch-size", "3", "--sampling-steps", "2",
                 "--cfg-scale", "1.5"]) == 0
    assert main(["eval", "--samples", samples, "--ref", ref, "--random-inception", "--json",
                 str(tmp_path / "m.json")]) == 0
    metrics = json.loads((tmp_path / "m.json").read_text())
    logged = client.get_run(run_id).data.metrics  # the latest value of each key: step 4
    for k in ("fid", "sfid", "inception_score", "precision", "recall"):
        assert logged[f"eval/{k}"] == pytest.approx(metrics[k], rel=1e-3, abs=1e-6), k
