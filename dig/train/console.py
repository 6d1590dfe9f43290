"""What `dig train` shows on the console (rank 0): a start line, progress with step N/total, img/s and ETA, the
metrics every `tracking.log_every` steps, and an end summary. On a terminal the progress is a tqdm bar; in a log
(not a terminal) it is one line per `log_every` steps (see dig/progress.py for DIG_PROGRESS).

Also silences warnings known to be harmless that the training stack emits at every run.
"""
from __future__ import annotations

import logging
import os
import warnings

from dig.progress import Progress

log = logging.getLogger("dig.train")


def filter_known_warnings() -> None:
    """DeepSpeed 0.19 calls torch.distributed's all_gather_into_tensor / reduce_scatter_tensor, which torch 2.13
    marks deprecated (FutureWarning, twice per run, nothing for a user to do)."""
    warnings.filterwarnings("ignore", category=FutureWarning,
                            message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is "
                                    r"deprecated")


def _count_parameters(module) -> int:
    # under ZeRO-3 a parameter's local tensor is a placeholder; DeepSpeed keeps the real size in ds_numel
    return sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters())


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class TrainingConsole:
    def __init__(self, cfg, runtime, accum: int, start_step: int, module, tracker, precision: str):
        self.cfg, self.rt = cfg, runtime
        self.active = runtime.is_main
        self.start_step = start_step
        self.batch = cfg.data.global_batch_size
        self.last_metrics: dict = {}
        if not self.active:
            self.progress = None
            return
        params = _count_parameters(module)
        resumed = f"resuming at step {start_step}" if start_step else "from step 0"
        print(f"[dig train] {cfg.model.name}: {params / 1e6:.2f}M params | world size {runtime.world_size} "
              f"({runtime.device.type}, {precision}, ZeRO-{cfg.engine.zero_stage}) | global batch {self.batch} = "
              f"{runtime.world_size} rank(s) x {cfg.data.micro_batch_size} micro x {accum} accumulation | "
              f"{cfg.steps} steps, {resumed} | run dir {os.path.abspath(cfg.run.dir)}"
              + (f" | MLflow run {tracker.run_name} ({tracker.run_id})" if tracker.run_id else "")
              + (f" {tracker.ui_url}" if tracker.ui_url else ""), flush=True)
        self.progress = Progress(total=cfg.steps, desc="[dig train] step", unit="step", initial=start_step,
                                 interval=float("inf"))  # lines mode: one line per log_every (log_metrics)
        self._redirect = None
        if self.progress.mode == "bar":  # log records go above the bar instead of through it
            from tqdm.contrib.logging import logging_redirect_tqdm

            self._redirect = logging_redirect_tqdm()
            self._redirect.__enter__()

    def step_done(self) -> None:
        if self.progress is not None:
            self.progress.update(1)
            rate = self.progress.rate
            if rate:
                self.progress.set_postfix(**{"img/s": rate * self.batch, **self._short(self.last_metrics)})

    @staticmethod
    def _short(metrics: dict) -> dict:
        return {k: metrics[k] for k in ("loss", "lr") if k in metrics}

    def log_metrics(self, step: int, metrics: dict) -> None:
        """At a logging step: the progress line (lines mode) or the metrics above the bar (terminal)."""
        if self.progress is None:
            return
        self.last_metrics = metrics
        details = " ".join(f"{k}={v:.4g}" for k, v in metrics.items())
        if self.progress.mode == "bar":
            self.progress.write(f"[dig train] step {step} {details}")
        elif self.progress.mode == "lines":  # one line: step N/total [elapsed<ETA, rate, every metric]
            self.progress.set_postfix(**metrics)
            self.progress.emit()

    def close(self, status: str, step: int, checkpoint: str | None = None) -> None:
        if self.progress is None:
            return
        elapsed = self.progress.elapsed
        self.progress.close()
        if self._redirect is not None:
            self._redirect.__exit__(None, None, None)
        if status == "KILLED":  # stopped by a signal: the trainer's one `stopped at step N …` line says it
            return
        done = step - self.start_step
        rate = f", {done / elapsed:.3g} step/s, {done * self.batch / elapsed:.4g} img/s" if done and elapsed else ""
        loss = f", last logged loss {self.last_metrics['loss']:.4g}" if "loss" in self.last_metrics else ""
        where = f"; checkpoint {checkpoint}" if checkpoint else ""
        print(f"[dig train] {status.lower()} at step {step}/{self.cfg.steps}: {done} steps in {_duration(elapsed)}"
              f"{rate}{loss}{where}", flush=True)
