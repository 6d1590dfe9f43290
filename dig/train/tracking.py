"""MLflow tracking for a run, from rank 0 only (other ranks get a tracker that does nothing).

The MLflow run id is stored in `<run dir>/tracking.json`; a resumed training run reopens the same MLflow run.
Tracking URI: tracking.uri, else $MLFLOW_TRACKING_URI, else MLflow's local store `sqlite:///mlflow.db`.
Parameters are the flattened resolved config with anything that looks like a credential removed.
"""
from __future__ import annotations

import json
import logging
import os
import re
from typing import Any

from .config import flatten

log = logging.getLogger(__name__)

TRACKING_FILE = "tracking.json"
DEFAULT_URI = "sqlite:///mlflow.db"
_SECRET_KEY = re.compile(r"(secret|password|passwd|token|credential|access_key|api_key)", re.I)
_URL_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")


def redact(params: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in params.items():
        if _SECRET_KEY.search(k):
            out[k] = "<redacted>"
        elif isinstance(v, str):
            out[k] = _URL_USERINFO.sub("<redacted>@", v)
        else:
            out[k] = v
    return out


def tracking_uri(configured: str | None) -> str:
    """The URI to use, with a relative local store (`sqlite:///mlflow.db`, a plain folder) made absolute against
    the current directory: tracking.json stores it, and a resume from another directory must reach the same
    store."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        path = uri[len("sqlite:///"):]
        return "sqlite:///" + os.path.abspath(path) if path and not path.startswith(":memory:") else uri
    if ":" not in uri:
        return os.path.abspath(uri)  # a plain folder (MLflow's file store)
    return uri


class NullTracker:
    run_id: str | None = None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_image(self, image, artifact_file: str) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def close(self, status: str = "FINISHED") -> None: ...


class MlflowTracker(NullTracker):
    def __init__(self, run_dir: str, uri: str | None, experiment: str, run_name: str, config: dict, step: int):
        import mlflow

        self.mlflow = mlflow
        self.uri = tracking_uri(uri)
        params = redact({k: json.dumps(v) if isinstance(v, (list, dict)) else v
                         for k, v in flatten(config).items()})
        state_path = os.path.join(run_dir, TRACKING_FILE)
        previous = None
        if os.path.exists(state_path):
            with open(state_path) as f:
                previous = json.load(f)
        setting = uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
        if previous and previous.get("setting", previous["uri"]) == setting:
            # The same setting as when the run started: the store it resolved to then, whatever the cwd is now
            # (tracking.json written before URIs were stored absolute holds the relative one: read against the cwd).
            self.uri = tracking_uri(previous["uri"])
        mlflow.set_tracking_uri(self.uri)
        if previous and tracking_uri(previous["uri"]) == self.uri:
            run = mlflow.start_run(run_id=previous["run_id"])
            logged = run.data.params
            changed = {k: v for k, v in params.items() if k in logged and logged[k] != str(v)}
            new = {k: v for k, v in params.items() if k not in logged}
            if new:
                mlflow.log_params(new)
            if changed:  # MLflow params are immutable; record what the resumed run changed as a tag
                mlflow.set_tag(f"resumed_at_step_{step}.changed_params", json.dumps(changed)[:5000])
            mlflow.set_tag("last_resume_step", str(step))
        else:
            mlflow.set_experiment(experiment)
            run = mlflow.start_run(run_name=run_name)
            items = list(params.items())
            for i in range(0, len(items), 100):
                mlflow.log_params(dict(items[i:i + 100]))
            mlflow.set_tag("run_dir", os.path.abspath(run_dir))
            with open(state_path + ".tmp", "w") as f:
                json.dump({"uri": self.uri, "setting": setting, "run_id": run.info.run_id,
                           "experiment_id": run.info.experiment_id}, f)
            os.replace(state_path + ".tmp", state_path)
        self.run_id = run.info.run_id
        log.info("MLflow run %s at %s", self.run_id, self.uri)

    # A tracking server that is briefly unreachable must not end a long training run: failures after MLflow's
    # own retries are logged as warnings and counted (reported with the next successful metrics).
    failures = 0

    def _guard(self, what: str, fn, *args, **kwargs) -> None:
        try:
            fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - reported, counted, training goes on
            self.failures += 1
            log.warning("MLflow %s failed (%s: %s); %d tracking failures so far", what, type(exc).__name__, exc,
                        self.failures)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        values = {k: float(v) for k, v in metrics.items()}
        if self.failures:
            values["tracking_failures"] = float(self.failures)
        self._guard("log_metrics", self.mlflow.log_metrics, values, step=step)

    def log_image(self, image, artifact_file: str) -> None:
        self._guard("log_image", self.mlflow.log_image, image, artifact_file=artifact_file)

    def set_tags(self, tags: dict[str, str]) -> None:
        self._guard("set_tags", self.mlflow.set_tags, tags)

    def close(self, status: str = "FINISHED") -> None:
        self.mlflow.end_run(status=status)


def make_tracker(is_main: bool, run_dir: str, cfg, resolved_config: dict, step: int) -> NullTracker:
    if not is_main:
        return NullTracker()
    t = cfg.tracking
    return MlflowTracker(run_dir, t.uri, t.experiment, cfg.run.name, resolved_config, step)
