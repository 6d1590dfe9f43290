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
    with pytest.raises(FileNotFoundError, match="neither a checkpoint folder nor a run directory"):
        checkpoint.resolve_checkpoint(str(tmp_path / "nothing"))
    assert checkpoint.latest_checkpoint(str(tmp_path / "nothing")) is None


def test_latest_naming_a_missing_folder_is_an_error(tmp_path):
    run = make_run(tmp_path, [], latest=7)
    with pytest.raises(FileNotFoundError, match="names step_000000007, which does not exist"):
        checkpoint.latest_checkpoint(run)
