"""MLflow tracking for a run, from rank 0 only (other ranks get a tracker that does nothing).

The MLflow run id is stored in `<run dir>/tracking.json`; a resumed training run reopens the same MLflow run.
Tracking URI: tracking.uri, else $MLFLOW_TRACKING_URI, else MLflow's local store `sqlite:///mlflow.db`.
What a run holds: params = the effective config (every key, defaults included; anything that looks like a
credential removed), artifacts `config/effective.yaml`, `config/user.yaml` (what was written), `config/deepspeed.json`
(the engine's final JSON), metrics from the trainer plus MLflow's own system metrics (`system/*`: CPU, memory,
disk, network, and GPU utilisation/memory/power through nvidia-ml-py), sample grids as the step-keyed image
`samples`, `checkpoint.*` tags, and at the end of a finished run the EMA export under `model/`. Run names are
`<run.name>-<UTC time>-<4 hex>`; the experiment is tagged as model training so the UI opens on its runs.
"""
from __future__ import annotations

import json
import logging
import os
import re
import secrets
import time
from typing import Any

from .config import flatten

log = logging.getLogger(__name__)

TRACKING_FILE = "tracking.json"
SAMPLES_KEY = "samples"                 # the step-keyed sample grids
MODEL_ARTIFACT_PATH = "model"           # the final EMA export
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"  # MLflow 3's UI reads it to pick the experiment's default view
EXPERIMENT_KIND = "custom_model_development"
# MLflow 3.17's UI takes the GenAI / model-training switch from this URL parameter (else from the browser's last
# choice, GenAI at first) and no longer from the experiment tag: links we print carry it.
UI_VIEW = "?workflowType=machine_learning"
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


def redact_nested(config: dict) -> dict:
    """`redact` applied to a nested config (for the YAML artifacts)."""
    out = {}
    for k, v in config.items():
        out[k] = redact_nested(v) if isinstance(v, dict) else next(iter(redact({k: v}).values()))
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
    run_name: str | None = None
    ui_url: str | None = None                 # the run's page in the MLflow UI, when the store is a server

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_image(self, image, artifact_file: str) -> None: ...
    def log_samples(self, image, step: int) -> None: ...
    def checkpoint_saved(self, path: str, step: int) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def close(self, status: str = "FINISHED") -> None: ...


class MlflowTracker(NullTracker):
    def __init__(self, run_dir: str, uri: str | None, experiment: str, run_name: str, config: dict, step: int,
                 user_config: dict | None = None, deepspeed_json: dict | None = None, system_metrics: bool = True,
                 system_metrics_interval: float = 10.0, log_model: bool = True, tags: dict[str, str] | None = None):
        """`tags`: settings outside the config that change the run's numerics (e.g. environment variables); a
        resumed run that changes one records the change as a tag, as it does for params."""
        import mlflow

        self.mlflow = mlflow
        self.uri = tracking_uri(uri)
        self.log_model_at_end = log_model
        self.latest_checkpoint: str | None = None
        params = redact({k: json.dumps(v) if isinstance(v, (list, dict)) else v
                         for k, v in flatten(config).items()})
        if system_metrics:
            mlflow.set_system_metrics_sampling_interval(system_metrics_interval)
            # its start/stop/"no GPU" INFO lines say nothing a user acts on; failures are warnings and still show
            logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
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
            run = mlflow.start_run(run_id=previous["run_id"], log_system_metrics=system_metrics)
            logged = run.data.params
            changed = {k: v for k, v in params.items() if k in logged and logged[k] != str(v)}
            new = {k: v for k, v in params.items() if k not in logged}
            if new:
                mlflow.log_params(new)
            if changed:  # MLflow params are immutable; record what the resumed run changed as a tag
                mlflow.set_tag(f"resumed_at_step_{step}.changed_params", json.dumps(changed)[:5000])
            # (a run started before a tag existed records [null, now]: its setting then is unknown)
            changed_tags = {k: [run.data.tags.get(k), v] for k, v in (tags or {}).items() if run.data.tags.get(k) != v}
            if changed_tags:  # tags are overwritten below: keep [before, after]
                mlflow.set_tag(f"resumed_at_step_{step}.changed_tags", json.dumps(changed_tags)[:5000])
            if tags:
                mlflow.set_tags(tags)
            mlflow.set_tag("last_resume_step", str(step))
        else:
            experiment_id = ensure_training_experiment(mlflow, experiment)
            run = mlflow.start_run(experiment_id=experiment_id, run_name=unique_run_name(run_name),
                                   log_system_metrics=system_metrics)
            items = list(params.items())
            for i in range(0, len(items), 100):
                mlflow.log_params(dict(items[i:i + 100]))
            mlflow.set_tags({"run_dir": os.path.abspath(run_dir), "dig.run.name": run_name, **(tags or {})})
            with open(state_path + ".tmp", "w") as f:
                json.dump({"uri": self.uri, "setting": setting, "run_id": run.info.run_id,
                           "experiment_id": run.info.experiment_id}, f)
            os.replace(state_path + ".tmp", state_path)
        self.run_id = run.info.run_id
        self.run_name = run.info.run_name
        self.ui_url = (f"{self.uri.rstrip('/')}/#/experiments/{run.info.experiment_id}/runs/{self.run_id}{UI_VIEW}"
                       if self.uri.startswith(("http://", "https://")) else None)
        # The configuration as files beside the params: every key with its default, what the user wrote, and the
        # DeepSpeed JSON the engine was built with (written again on resume: it may differ, e.g. the world size).
        self._guard("log_dict", mlflow.log_dict, redact_nested(config), "config/effective.yaml")
        if user_config is not None:
            self._guard("log_dict", mlflow.log_dict, redact_nested(user_config), "config/user.yaml")
        if deepspeed_json is not None:
            self._guard("log_dict", mlflow.log_dict, deepspeed_json, "config/deepspeed.json")
        log.info("MLflow run %s (%s) at %s", self.run_id, run.info.run_name, self.uri)

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

    def log_samples(self, image, step: int) -> None:
        """A sample grid as a step-keyed image: the UI's image view shows it over the training steps."""
        self._guard("log_image", self.mlflow.log_image, image, key=SAMPLES_KEY, step=step, synchronous=True)

    def set_tags(self, tags: dict[str, str]) -> None:
        self._guard("set_tags", self.mlflow.set_tags, tags)

    def checkpoint_saved(self, path: str, step: int) -> None:
        self.latest_checkpoint = path if "://" in path else os.path.abspath(path)
        self.set_tags({"checkpoint.latest": self.latest_checkpoint,
                       f"checkpoint.step_{step:09d}": self.latest_checkpoint})

    def log_final_model(self) -> None:
        """The last checkpoint's EMA weights as `dig export` writes them (model.safetensors + config.json with
        the architecture, latent shape, normaliser, VAE and class names) under the run's `model/` artifacts."""
        import tempfile

        from .export import export

        with tempfile.TemporaryDirectory(prefix="dig-mlflow-model-") as folder:
            export(self.latest_checkpoint, folder, weights="ema", progress=False)
            self._guard("log_artifacts", self.mlflow.log_artifacts, folder, MODEL_ARTIFACT_PATH)
        self.set_tags({"model.artifact": MODEL_ARTIFACT_PATH, "model.source_checkpoint": self.latest_checkpoint})

    def close(self, status: str = "FINISHED") -> None:
        if status == "FINISHED" and self.log_model_at_end and self.latest_checkpoint:
            if "://" in self.latest_checkpoint:  # export reads a local folder; `dig export` the staged copy
                log.info("final model not logged: the last checkpoint is at %s", self.latest_checkpoint)
            else:
                try:
                    self.log_final_model()
                except Exception as exc:  # noqa: BLE001 - the run itself finished; say why the model is missing
                    log.warning("could not log the final model to MLflow (%s: %s)", type(exc).__name__, exc)
        self.mlflow.end_run(status=status)


class JsonlTracker(NullTracker):
    """For machines without MLflow (or offline runs): metrics and tags as JSON lines in <run dir>/metrics.jsonl,
    each with the wall-clock time it was logged at; images as files under <run dir>/images/."""

    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        self.path = os.path.join(run_dir, METRICS_FILE)

    def _append(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"time": time.time(), **record}) + "\n")

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._append({"step": step, **{k: float(v) for k, v in metrics.items()}})

    def log_image(self, image, artifact_file: str) -> None:
        path = os.path.join(self.run_dir, "images", artifact_file)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        image.save(path)

    def log_samples(self, image, step: int) -> None:
        self.log_image(image, f"samples/step_{step:09d}.png")

    def checkpoint_saved(self, path: str, step: int) -> None:
        self._append({"checkpoint": path if "://" in path else os.path.abspath(path), "checkpoint_step": step})

    def set_tags(self, tags: dict[str, str]) -> None:
        self._append({"tags": tags})


METRICS_FILE = "metrics.jsonl"


def ensure_training_experiment(mlflow, name: str) -> str:
    """The experiment's id, created if needed and tagged as model training, so MLflow 3's UI opens it on its
    runs (not on the GenAI traces view)."""
    experiment = mlflow.get_experiment_by_name(name)
    experiment_id = experiment.experiment_id if experiment else mlflow.create_experiment(name)
    if not experiment or experiment.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
        mlflow.MlflowClient().set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return experiment_id


def unique_run_name(name: str) -> str:
    """`<run.name>-<UTC time>-<4 hex>`: two runs of one config never share a name in the UI."""
    return f"{name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(2)}"


def make_tracker(is_main: bool, run_dir: str, cfg, resolved_config: dict, step: int,
                 deepspeed_json: dict | None = None, tags: dict[str, str] | None = None) -> NullTracker:
    """`resolved_config`: what the user wrote (YAML + overrides); the params are the effective config of `cfg`
    (every key, defaults included)."""
    if not is_main:
        return NullTracker()
    t = cfg.tracking
    if t.backend == "jsonl":
        tracker = JsonlTracker(run_dir)
        if tags:  # one record per start and resume: the history of these settings
            tracker.set_tags(tags)
        return tracker
    if t.backend == "none":
        return NullTracker()
    return MlflowTracker(run_dir, t.uri, t.experiment, cfg.run.name, cfg.model_dump(mode="json"), step,
                         user_config=resolved_config, deepspeed_json=deepspeed_json,
                         system_metrics=t.system_metrics, system_metrics_interval=t.system_metrics_interval,
                         log_model=t.log_model, tags=tags)
