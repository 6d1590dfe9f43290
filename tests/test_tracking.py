"""MLflow tracking: the store a run started in is found again when it is resumed from another directory, with the
run's tags (changes on resume recorded)."""
from __future__ import annotations

import json
import os

import pytest

from dig.train.tracking import TRACKING_FILE, MlflowTracker, tracking_uri


def test_relative_uris_are_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri(None) == f"sqlite:///{tmp_path}/mlflow.db"
    assert tracking_uri("sqlite:///sub/x.db") == f"sqlite:///{tmp_path}/sub/x.db"
    assert tracking_uri("sqlite:////abs/x.db") == "sqlite:////abs/x.db"
    assert tracking_uri("mlruns") == f"{tmp_path}/mlruns"
    assert tracking_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"


@pytest.mark.slow
def test_resume_from_another_directory_reopens_the_same_run(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir(), second.mkdir()
    run_dir = str(tmp_path / "run")
    os.makedirs(run_dir)
    monkeypatch.chdir(first)
    tracker = MlflowTracker(run_dir, None, "exp", "name", {"optim": {"lr": 1e-4}}, step=0,
                            tags={"dig.gla_dots_16bit": "mixed", "unchanged": "1"})
    tracker.log_metrics({"loss": 1.0}, step=1)
    tracker.close("KILLED")
    stored = json.load(open(os.path.join(run_dir, TRACKING_FILE)))
    assert stored["uri"] == f"sqlite:///{first}/mlflow.db"
    monkeypatch.chdir(second)   # the same command (default URI) from another directory
    resumed = MlflowTracker(run_dir, None, "exp", "name", {"optim": {"lr": 1e-4}}, step=1,
                            tags={"dig.gla_dots_16bit": "tf32", "unchanged": "1", "new": "x"})
    resumed.log_metrics({"loss": 0.5}, step=2)
    resumed.close()
    assert resumed.run_id == tracker.run_id
    assert not (second / "mlflow.db").exists()
    from mlflow import MlflowClient

    history = MlflowClient(tracking_uri=stored["uri"]).get_metric_history(tracker.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(1, 1.0), (2, 0.5)]
    # a tag set outside the config (an environment variable) that the resumed run changed: now, and what it was
    tags = MlflowClient(tracking_uri=stored["uri"]).get_run(tracker.run_id).data.tags
    assert tags["dig.gla_dots_16bit"] == "tf32" and tags["unchanged"] == "1" and tags["new"] == "x"
    assert json.loads(tags["resumed_at_step_1.changed_tags"]) == {"dig.gla_dots_16bit": ["mixed", "tf32"],
                                                                  "new": [None, "x"]}  # unknown before
