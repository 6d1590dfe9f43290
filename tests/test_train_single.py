"""`dig train` in one process (DeepSpeed ZeRO-3 on the CPU accelerator, world size 1), MLflow's local default
store: bad input (non-finite losses, wrong resolution) and fine-tuning at a larger resolution from an export."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from dig.data.reader import LatentShardReader
from dig.data.synthetic import write_synthetic_dataset

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "train", "tiny-cpu.yaml")
MODEL = dict(depth=2, hidden_size=64, num_heads=2)


def dig_train(cwd: str, *overrides: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": os.path.join(REPO, ".torch_extensions"), "DS_ACCELERATOR": "cpu",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO, **(env or {})}
    for k in ("MLFLOW_TRACKING_URI", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "dig.cli", "train", "--config", TINY, "run.dir=run", "tracking.sample_every=0",
           "tracking.log_every=1", "data.global_batch_size=4", "data.micro_batch_size=4", *overrides]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("zero_stage", [3, 0])
def test_nonfinite_losses_are_skipped_and_counted(tmp_path, zero_stage):
    """ZeRO-3 checks the loss before the backward; stage 0 with fp32 weights runs the backward first
    (engine.backward_before_loss_check) and drops the skipped micro-batch's gradients: any left behind would make
    every later loss NaN too."""
    bad = frozenset({9})  # NaN posterior mean: a micro-batch holding it has a NaN loss
    write_synthetic_dataset(str(tmp_path / "latents"), num_shards=4, samples_per_shard=4, nonfinite_indices=bad)
    done = dig_train(str(tmp_path), f"data.path={tmp_path / 'latents'}", "steps=6", "run.seed=1",
                     "max_nonfinite_in_a_row=10", "tracking.step_log=true", "checkpoint.every=2",
                     "checkpoint.keep_last=2", f"engine.zero_stage={zero_stage}")
    assert done.returncode == 0, done.stderr[-4000:]
    # Independent of the trainer: replay the reader's batch sequence and count the batches holding a bad key
    # until 6 clean ones have been seen.
    reader = LatentShardReader(str(tmp_path / "latents"), rank=0, world_size=1, micro_batch_size=4, seed=1,
                               window_shards=2)
    clean, skipped, clean_keys = 0, 0, []
    while clean < 6:
        keys = reader.next_batch().keys
        if {int(k) for k in keys} & bad:
            skipped += 1
        else:
            clean += 1
            clean_keys.append(keys)
    reader.close()
    assert skipped > 0
    with open(tmp_path / "run" / "steps" / "rank_00000.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert [r["keys"] for r in records] == clean_keys
    assert all(r["loss"] == r["loss"] for r in records)  # finite (not NaN) at every logged step
    assert "non-finite loss, batch skipped" in done.stderr
    checkpoints = sorted(os.listdir(tmp_path / "run" / "checkpoints"))
    assert checkpoints == ["latest", "step_000000004", "step_000000006"]  # keep_last=2

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")  # the default store, in the cwd
    run_id = json.load(open(tmp_path / "run" / "tracking.json"))["run_id"]
    history = {m.step: m.value for m in client.get_metric_history(run_id, "nonfinite_skipped")}
    assert history[6] == skipped
    assert client.get_run(run_id).info.status == "FINISHED"


def test_abort_after_too_many_nonfinite_losses_in_a_row(tmp_path):
    write_synthetic_dataset(str(tmp_path / "latents"), num_shards=2, samples_per_shard=4,
                            nonfinite_indices=frozenset(range(8)))
    done = dig_train(str(tmp_path), f"data.path={tmp_path / 'latents'}", "steps=6", "max_nonfinite_in_a_row=3")
    assert done.returncode == 3
    assert "aborting at step 1: 3 non-finite losses in a row (max_nonfinite_in_a_row=3)" in done.stderr
    assert not os.path.exists(tmp_path / "run" / "checkpoints" / "latest")


def test_resolution_not_matching_the_shards_fails_at_start(tmp_path, capsys):
    # in this process: the check runs before DeepSpeed or a process group is touched
    from dig.cli import main

    write_synthetic_dataset(str(tmp_path / "latents"), num_shards=2, samples_per_shard=4)
    assert main(["train", "--config", TINY, f"run.dir={tmp_path / 'run'}", f"data.path={tmp_path / 'latents'}",
                 "data.resolution=256"]) == 2
    err = capsys.readouterr().err
    assert "data.resolution=256 but the shards" in err and "hold 64px latents (latent 8x8)" in err
    assert not os.path.exists(tmp_path / "run")


def test_finetune_at_higher_resolution_from_an_export(tmp_path):
    """A 64px (8x8 latent) model, exported by hand, starts a 128px (16x16) run: the weights load unchanged
    (lr 0 keeps them) and the position grid is scaled to the 8x8 base."""
    from safetensors.torch import save_file

    from dig.models import create_model
    from dig.train.export import load_exported

    torch.manual_seed(123)
    source = create_model("DiG-S/2", input_size=8, num_classes=10, **MODEL)
    src_dir = tmp_path / "source"
    src_dir.mkdir()
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(src_dir / "model.safetensors"))
    (src_dir / "config.json").write_text(json.dumps({"model": "DiG-S/2", "model_kwargs": dict(
        input_size=8, num_classes=10, **MODEL)}))
    write_synthetic_dataset(str(tmp_path / "latents16"), num_shards=2, samples_per_shard=4, latent_size=16)
    done = dig_train(str(tmp_path), f"data.path={tmp_path / 'latents16'}", "data.resolution=128", "steps=1",
                     "optim.lr=0", f"model.init_from={src_dir}")
    assert done.returncode == 0, done.stderr[-4000:]
    meta = json.load(open(tmp_path / "run" / "checkpoints" / "step_000000001" / "trainer.json"))
    assert meta["model_kwargs"]["input_size"] == 16 and meta["model_kwargs"]["pos_embed_base_size"] == 8

    from dig.train.export import export

    model, _ = load_exported(export(str(tmp_path / "run"), str(tmp_path / "raw"), weights="raw"))
    for name, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name
    reference = create_model("DiG-S/2", input_size=16, num_classes=10, pos_embed_base_size=8, **MODEL)
    assert torch.equal(model.pos_embed, reference.pos_embed)

    # resuming keeps the architecture the run started with (the scaled grid came from init_from, not the YAML)
    done = dig_train(str(tmp_path), f"data.path={tmp_path / 'latents16'}", "data.resolution=128", "steps=2",
                     "optim.lr=0", f"model.init_from={src_dir}")
    assert done.returncode == 0, done.stderr[-4000:]
    assert "resumed from" in done.stderr
    meta = json.load(open(tmp_path / "run" / "checkpoints" / "step_000000002" / "trainer.json"))
    assert meta["model_kwargs"]["pos_embed_base_size"] == 8


def test_sigterm_checkpoints_and_stops(tmp_path):
    """SIGTERM (what schedulers send before killing) ends the run after the current step with a checkpoint."""
    import signal
    import time

    write_synthetic_dataset(str(tmp_path / "latents"), num_shards=2, samples_per_shard=8)
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": os.path.join(REPO, ".torch_extensions"), "DS_ACCELERATOR": "cpu",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [sys.executable, "-m", "dig.cli", "train", "--config", TINY, "run.dir=run", "tracking.sample_every=0",
           f"data.path={tmp_path / 'latents'}", "steps=100000", "checkpoint.every=100000", "tracking.step_log=true"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log = tmp_path / "run" / "steps" / "rank_00000.jsonl"
    deadline = time.monotonic() + 240
    while not (log.exists() and len(log.read_text().splitlines()) >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-3000:]   # the documented code of a clean stop
    steps_done = len(log.read_text().splitlines())
    from dig.train.checkpoint import latest_checkpoint

    latest = latest_checkpoint(str(tmp_path / "run"))
    assert latest.endswith(f"step_{steps_done:09d}")
    assert [ln for ln in err.splitlines() if "stopped" in ln] == \
        [f"dig train: stopped at step {steps_done}; checkpoint {latest}; run the same command to resume"]
    assert "Traceback" not in err
    from mlflow import MlflowClient

    run_id = json.load(open(tmp_path / "run" / "tracking.json"))["run_id"]
    assert MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db").get_run(run_id).info.status == "KILLED"


def test_compiled_blocks_train_like_eager(tmp_path):
    """model.compile=true (ZeRO-2; a graph per block, and the whole block stack as one region) follows the eager
    run's losses step for step."""
    write_synthetic_dataset(str(tmp_path / "latents"), num_shards=2, samples_per_shard=8)
    losses = {}
    settings = {"eager": ["model.compile=false"], "compiled": ["model.compile=true"],
                "stack": ["model.compile=true", "model.compile_scope=stack"]}
    for variant, overrides in settings.items():
        run = tmp_path / variant
        run.mkdir()
        done = dig_train(str(run), f"data.path={tmp_path / 'latents'}", "steps=3", "engine.zero_stage=2",
                         *overrides, "tracking.step_log=true", "checkpoint.every=0")
        assert done.returncode == 0, done.stderr[-4000:]
        assert ("2 blocks compiled" in done.stderr) == (variant != "eager")
        assert ("the stack as one region" in done.stderr) == (variant == "stack")
        with open(run / "run" / "steps" / "rank_00000.jsonl") as f:
            losses[variant] = [json.loads(line)["loss"] for line in f]
    assert len(losses["eager"]) == 3
    # Inductor reorders reductions: equal up to float32 rounding, not bit for bit.
    torch.testing.assert_close(losses["compiled"], losses["eager"], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(losses["stack"], losses["eager"], rtol=1e-4, atol=1e-6)


def test_step_log_losses_and_zero3_whole_block_gathers(tmp_path):
    """The per-step metrics (read back once per micro-batch, together with the non-finite flag) are the mean
    over the step's micro-batches of the diffusion losses. Reference: the same model, batches, timesteps and
    noise replayed here with plain PyTorch (step 1 from the initial weights, step 2 from the weights DeepSpeed
    consolidates from the step-1 checkpoint), following the trainer's documented seeding. The run is ZeRO-3 with
    each block gathered whole (DeepSpeed leaf modules); a ZeRO-2 run must follow its losses step for step."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from dig.diffusion import create_diffusion
    from dig.models import create_model

    write_synthetic_dataset(str(tmp_path / "latents"), num_shards=2, samples_per_shard=8)
    seed, records = 3, {}
    for stage in (3, 2):
        (tmp_path / f"zero{stage}").mkdir()
        done = dig_train(str(tmp_path / f"zero{stage}"), f"data.path={tmp_path / 'latents'}", "steps=3",
                         f"run.seed={seed}", "data.global_batch_size=4", "data.micro_batch_size=2",  # 2 per step
                         f"engine.zero_stage={stage}", "tracking.step_log=true",
                         f"checkpoint.every={1 if stage == 3 else 0}", "checkpoint.keep_last=3")
        assert done.returncode == 0, done.stderr[-4000:]
        assert ("ZeRO-3: 2 blocks gathered whole" in done.stderr) == (stage == 3)
        with open(tmp_path / f"zero{stage}" / "run" / "steps" / "rank_00000.jsonl") as f:
            records[stage] = [json.loads(line) for line in f]
        assert [r["step"] for r in records[stage]] == [1, 2, 3]
    losses = {stage: [r["loss"] for r in records[stage]] for stage in records}
    assert len(set(losses[3])) == 3  # it trains: the loss moves
    torch.testing.assert_close(losses[2], losses[3], rtol=1e-5, atol=1e-7)

    torch.manual_seed(seed)
    model = create_model("DiG-S/2", input_size=8, num_classes=10, **MODEL).train()
    diffusion = create_diffusion(learn_sigma=True)
    reader = LatentShardReader(str(tmp_path / "latents"), rank=0, world_size=1, micro_batch_size=2, seed=seed,
                               window_shards=2, prefetch=False, prefetch_batches=0)
    torch.manual_seed(seed * 1_000_003 + 7919)  # the trainer's per-rank stream (rank 0)
    for record in records[3][:2]:
        if record["step"] == 2:
            ckpt = str(tmp_path / "zero3" / "run" / "checkpoints" / "step_000000001")
            model.load_state_dict(get_fp32_state_dict_from_zero_checkpoint(ckpt, tag="engine"))
        sums, keys = {"loss": 0.0, "mse": 0.0, "vb": 0.0}, []
        for _ in range(2):
            batch = reader.next_batch()
            t = torch.randint(0, diffusion.num_timesteps, (2,))
            with torch.no_grad():
                terms = diffusion.training_losses(model, batch.latents, t, model_kwargs=dict(y=batch.labels))
            for k in sums:
                sums[k] += terms[k].double().mean().item() / 2
            keys += batch.keys
        assert record["keys"] == keys
        for k, want in sums.items():
            assert record[k] == pytest.approx(want, rel=1e-5, abs=1e-7), (record["step"], k)


def _plain_pytorch_replay(latents: str, seed: int, lr: float, steps: int, clip: float | None):
    """What the trainer computes, as a plain PyTorch loop: DiG-S/2 (tiny), AdamW, the lr warm-up of
    tiny-cpu.yaml, 2 micro-batches of 2 per step. Returns each step's loss and gradient norm (before clipping)."""
    from dig.diffusion import create_diffusion
    from dig.models import create_model
    from dig.train.engine import warmup_then_constant

    torch.manual_seed(seed)
    model = create_model("DiG-S/2", input_size=8, num_classes=10, **MODEL).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_then_constant(2))  # tiny-cpu.yaml: warmup_steps 2
    diffusion = create_diffusion(learn_sigma=True)
    reader = LatentShardReader(latents, rank=0, world_size=1, micro_batch_size=2, seed=seed,
                               window_shards=2, prefetch=False, prefetch_batches=0)
    torch.manual_seed(seed * 1_000_003 + 7919)
    losses, norms = [], []
    for _ in range(steps):
        loss_sum = 0.0
        for _ in range(2):
            batch = reader.next_batch()
            t = torch.randint(0, diffusion.num_timesteps, (2,))
            loss = diffusion.training_losses(model, batch.latents, t, model_kwargs=dict(y=batch.labels))["loss"].mean()
            (loss / 2).backward()
            loss_sum += loss.item() / 2
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), clip if clip else float("inf")).item())
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss_sum)
    return losses, norms


def test_without_zero_clipping_and_steps_match_plain_pytorch(tmp_path):
    """engine.zero_stage=0 with fp32 weights: DeepSpeed's step is the torch optimizer's and the trainer clips the
    gradients itself (torch's foreach clipping). With a clip threshold that binds at every step, the losses of 3
    steps of 2 micro-batches equal a plain-PyTorch replay (AdamW, clip_grad_norm_, the lr warm-up, the mean of
    the micro-batch gradients) and a ZeRO-2 run, where DeepSpeed clips."""
    write_synthetic_dataset(str(tmp_path / "latents"), num_shards=2, samples_per_shard=8)
    seed, clip, lr, records = 5, 0.02, 1e-3, {}
    for stage in (0, 2):
        (tmp_path / f"zero{stage}").mkdir()
        done = dig_train(str(tmp_path / f"zero{stage}"), f"data.path={tmp_path / 'latents'}", "steps=3",
                         f"run.seed={seed}", "data.micro_batch_size=2", f"engine.zero_stage={stage}",
                         f"optim.grad_clip={clip}", f"optim.lr={lr}", "tracking.step_log=true", "checkpoint.every=0")
        assert done.returncode == 0, done.stderr[-4000:]
        with open(tmp_path / f"zero{stage}" / "run" / "steps" / "rank_00000.jsonl") as f:
            records[stage] = [json.loads(line) for line in f]
    losses = {stage: [r["loss"] for r in records[stage]] for stage in records}
    torch.testing.assert_close(losses[0], losses[2], rtol=1e-5, atol=1e-7)
    want, norms = _plain_pytorch_replay(str(tmp_path / "latents"), seed, lr, len(records[0]), clip)
    assert losses[0] == pytest.approx(want, rel=1e-5, abs=1e-7)
    assert min(norms) > clip  # the threshold bound at every step, so clipping was exercised


def test_without_zero_or_clipping_the_gradient_norm_of_logged_steps(tmp_path):
    """No clipping: the trainer computes the gradient norm only for steps whose metrics are logged; the logged
    norm is that step's (plain-PyTorch replay), and the steps match the replay too."""
    write_synthetic_dataset(str(tmp_path / "latents"), num_shards=2, samples_per_shard=8)
    seed, lr = 6, 1e-3
    done = dig_train(str(tmp_path), f"data.path={tmp_path / 'latents'}", "steps=4", f"run.seed={seed}",
                     "data.micro_batch_size=2", "engine.zero_stage=0", "optim.grad_clip=0", f"optim.lr={lr}",
                     "tracking.backend=jsonl", "tracking.log_every=3", "tracking.step_log=true",
                     "checkpoint.every=0", env={"DIG_GLA_DOTS_16BIT": "fwd=bf16"})
    assert done.returncode == 0, done.stderr[-4000:]
    with open(tmp_path / "run" / "steps" / "rank_00000.jsonl") as f:
        losses = [json.loads(line)["loss"] for line in f]
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        records = list(map(json.loads, f))
    logged = {r["step"]: r for r in records if "step" in r}
    # the GLA dots mode is recorded beside the metrics, from the environment the run saw
    assert [r["tags"] for r in records if "tags" in r] == [{"dig.gla_dots_16bit": "fwd=bf16"}]
    want_losses, norms = _plain_pytorch_replay(str(tmp_path / "latents"), seed, lr, 4, None)
    assert losses == pytest.approx(want_losses, rel=1e-5, abs=1e-7)
    assert sorted(logged) == [3]
    assert logged[3]["grad_norm"] == pytest.approx(norms[2], rel=1e-5)


def test_img_per_sec_is_the_wall_time_between_logged_windows(tmp_path):
    """img/s of a window = its images / the wall time since the previous window was logged: blocking checkpoint
    writes in the window count (they stop training). The timestamps of the metrics records are the independent
    clock; summed over the windows, a lost checkpoint (~25 ms each here) adds up while the records' own timing
    jitter (two end points) does not."""
    write_synthetic_dataset(str(tmp_path / "latents"), num_shards=4, samples_per_shard=12)
    done = dig_train(str(tmp_path), f"data.path={tmp_path / 'latents'}", "steps=12", "tracking.backend=jsonl",
                     "tracking.log_every=2", "checkpoint.every=2", "checkpoint.background=false",
                     "checkpoint.keep_last=1")
    assert done.returncode == 0, done.stderr[-4000:]
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        windows = [r for r in map(json.loads, f) if "img_per_sec" in r]
    assert [r["step"] for r in windows] == [2, 4, 6, 8, 10, 12]
    seconds = sum(2 * 4 / r["img_per_sec"] for r in windows[1:])  # two steps of 4 images per window
    between = windows[-1]["time"] - windows[0]["time"]
    assert abs(seconds - between) < 0.02 * between + 0.015, (seconds, between)
