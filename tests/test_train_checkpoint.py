"""Run-directory checkpoint bookkeeping: the `latest` marker, keep-last-K, leftovers of a crashed save."""
from __future__ import annotations

import os

import pytest

from dig.train import checkpoint


def make_run(tmp_path, steps, latest):
    os.makedirs(tmp_path / "checkpoints", exist_ok=True)
    for s in steps:
        os.makedirs(checkpoint.step_dir(str(tmp_path), s))
        with open(os.path.join(checkpoint.step_dir(str(tmp_path), s), checkpoint.TRAINER_FILE), "w") as f:
            f.write("{}")
    with open(tmp_path / "checkpoints" / "latest", "w") as f:
        f.write(f"step_{latest:09d}")
    return str(tmp_path)


def test_prune_keeps_the_last_k_and_drops_unfinished_saves(tmp_path):
    run = make_run(tmp_path, [10, 20, 30, 40, 50], latest=30)  # 40 and 50: saves that never moved `latest`
    checkpoint.prune(run, keep_last=2)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["latest", "step_000000020", "step_000000030"]
    assert checkpoint.latest_checkpoint(run) == checkpoint.step_dir(run, 30)


def test_latest_is_kept_even_with_keep_last_zero(tmp_path):
    run = make_run(tmp_path, [1, 2], latest=2)
    checkpoint.prune(run, keep_last=0)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["latest", "step_000000002"]


def test_resolve_checkpoint(tmp_path):
    run = make_run(tmp_path, [5], latest=5)
    assert checkpoint.resolve_checkpoint(run) == checkpoint.step_dir(run, 5)
    assert checkpoint.resolve_checkpoint(checkpoint.step_dir(run, 5)) == checkpoint.step_dir(run, 5)
    # a checkpoint root of its own (checkpoint.uri=/some/folder): `latest` directly inside
    assert checkpoint.resolve_checkpoint(str(tmp_path / "checkpoints")) == checkpoint.step_dir(run, 5)
    with pytest.raises(FileNotFoundError, match="neither a checkpoint folder nor a run directory"):
        checkpoint.resolve_checkpoint(str(tmp_path / "nothing"))
    assert checkpoint.latest_checkpoint(str(tmp_path / "nothing")) is None


def test_latest_naming_a_missing_folder_is_an_error(tmp_path):
    run = make_run(tmp_path, [], latest=7)
    with pytest.raises(FileNotFoundError, match="names step_000000007, which does not exist"):
        checkpoint.latest_checkpoint(run)


def test_prune_during_a_save_never_touches_folders_past_latest(tmp_path):
    """Rank 0 prunes after `latest` moved while other ranks may already stage the next save."""
    run = make_run(tmp_path, [10, 20, 30, 40], latest=30)
    checkpoint.prune(run, keep_last=1, drop_unfinished=False)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["latest", "step_000000030", "step_000000040"]


def test_clean_unfinished_without_latest_removes_every_step_folder(tmp_path):
    from dig.train.checkpoint_writer import clean_unfinished

    root = tmp_path / "checkpoints"
    for s in (1, 2):
        os.makedirs(root / f"step_{s:09d}" / "engine")
    (root / ".tmp-123-latest").write_text("x")
    assert clean_unfinished(str(root), None) == ["step_000000001", "step_000000002"]
    assert os.listdir(root) == []


def test_remote_root_cleanup_fetch_and_prune(tmp_path, s3_bucket):
    """On the S3 server over HTTP: a partial save past `latest` is removed, `latest` is downloaded completely
    (once), old checkpoints beyond keep_last are deleted."""
    import boto3

    from dig.train.checkpoint_writer import DOWNLOADED_MARKER, clean_unfinished, fetch_latest, prune_remote

    s3 = boto3.client("s3")
    for step in (1, 2, 3):
        for name in ("trainer.json", "engine/zero_pp_rank_0_mp_rank_00_optim_states.pt", "rank_00000.pt"):
            if step == 3 and name != "rank_00000.pt":
                continue  # step 3: an upload that died half-way
            s3.put_object(Bucket=s3_bucket, Key=f"run/step_{step:09d}/{name}", Body=f"{step}:{name}".encode())
    s3.put_object(Bucket=s3_bucket, Key="run/latest", Body=b"step_000000002")
    root, staging = f"s3://{s3_bucket}/run", str(tmp_path / "staging")
    os.makedirs(os.path.join(staging, "step_000000003"))  # its local staging copy
    os.makedirs(os.path.join(staging, ".download-otherhost-99", "engine"))  # a download cut short
    assert clean_unfinished(root, staging) == ["step_000000003"]
    assert os.listdir(staging) == []
    local = fetch_latest(root, staging, local_rank=0)
    assert local == os.path.join(staging, "step_000000002")
    with open(os.path.join(local, "engine", "zero_pp_rank_0_mp_rank_00_optim_states.pt")) as f:
        assert f.read() == "2:engine/zero_pp_rank_0_mp_rank_00_optim_states.pt"
    assert os.path.exists(os.path.join(local, DOWNLOADED_MARKER))
    assert fetch_latest(root, staging, local_rank=1) == local  # other local ranks wait for local rank 0's copy
    prune_remote(root, keep_last=1, current="step_000000002")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket, Prefix="run/")["Contents"]]
    assert sorted({k.split("/")[1] for k in keys}) == ["latest", "step_000000002"]


def test_run_dir_on_s3_is_refused_with_a_pointer_to_checkpoint_uri():
    from dig.train.config import ConfigError, validate

    with pytest.raises(ConfigError, match="checkpoint.uri=s3://"):
        validate({"run": {"dir": "s3://bucket/run"}, "data": {"path": "x", "resolution": 256}})
