"""The training loop: data → loss → engine step → EMA → checkpoint → metrics, one named step each.

`Trainer(cfg, resolved).fit()` is what `dig train` runs in every process of a torchrun/deepspeed launch.
A run directory holds everything needed to continue: start the same command again and it resumes from the
run directory's `latest` checkpoint (weights, optimizer, lr schedule, EMA, data position, RNG states, MLflow
run), on the same or another number of ranks (dig/train/reshard.py). See dig/train/checkpoint.py for the layout
and dig/train/ema.py for where the EMA lives under ZeRO-3.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import time
from typing import NamedTuple

import torch
import torch.distributed as dist

from dig.data.reader import Batch, LatentShardReader, load_manifest
from dig.ops.gla_triton import DOTS_16BIT_SPEC as GLA_DOTS_16BIT
from dig.eval.during_training import TrainingEvaluator

from . import checkpoint, reshard
from .checkpoint_writer import CheckpointWriteError, CheckpointWriter, clean_unfinished, fetch_latest
from .config import ConfigError, TrainConfig
from .console import TrainingConsole, filter_known_warnings
from .ema import ShardedEMA
from .engine import Runtime, build_engine, init_distributed, shutdown
from .host_pacing import HostPacing
from .tracking import make_tracker

log = logging.getLogger("dig.train")

# bf16 dense peak per GPU, TFLOP/s, for MFU when tracking.peak_tflops is not set
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


class TrainingAborted(RuntimeError):
    """Training stopped on purpose (e.g. too many non-finite losses in a row); the message says why."""


class TrainingStopped(RuntimeError):
    """SIGTERM/SIGINT ended the run after a checkpoint; the message says where and how to continue."""


class Trainer:
    def __init__(self, cfg: TrainConfig, resolved: dict):
        self.cfg, self.resolved = cfg, resolved
        cfg.check_manifest(load_manifest(cfg.data.path)[1])  # wrong data fails before any process group
        self.rt: Runtime = init_distributed(cfg)
        self.run_dir = cfg.run.dir
        os.makedirs(self.run_dir, exist_ok=True)
        self.run_lock = self._lock_run_dir()
        resume_from = self._find_resume_checkpoint()
        self.resharding = reshard.needs_reshard(resume_from, self.rt.world_size)  # resume on another world size
        if self.resharding:
            reshard.check_world(cfg, resume_from, self.rt.world_size)
        cfg.check_world(self.rt.world_size)
        self.accum = cfg.grad_accum_steps(self.rt.world_size)

        self.data = LatentShardReader(
            cfg.data.path, rank=self.rt.rank, world_size=self.rt.world_size,
            micro_batch_size=cfg.data.micro_batch_size, seed=cfg.run.seed,
            window_shards=cfg.data.shuffle_window_shards, latent_norm=cfg.data.latent_norm,
            random_flip=cfg.data.random_flip, read_retries=cfg.data.read_retries,
            on_bad_shard=cfg.data.on_bad_shard, prefetch=cfg.data.prefetch,
            prefetch_batches=cfg.data.prefetch_batches, pin_memory=self.rt.device.type == "cuda")
        manifest = self.data.manifest
        self.latent_shape = list(self.data.sample_shape)

        self.model_kwargs = cfg.model_kwargs(manifest.latent_size)
        init_state = None
        if resume_from is not None:
            self.model_kwargs = self._resumed_model_kwargs(resume_from)
        elif cfg.model.init_from:
            init_state = self._init_weights_from(cfg.model.init_from)

        from dig.diffusion import create_diffusion
        from dig.models import create_model

        torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
        model = create_model(cfg.model.name, **self.model_kwargs)
        if init_state is not None:
            model.load_state_dict(init_state, strict=True)
        self.flops_per_image = training_flops_per_image(model)
        # CUDA graphs (compile_mode reduce-overhead) replay a block's recorded kernels: each step must be marked
        self._cudagraphs = cfg.model.compile and cfg.model.compile_mode == "reduce-overhead" \
            and self.rt.device.type == "cuda"
        if cfg.model.compile:
            mode = cfg.model.compile_mode if self.rt.device.type == "cuda" else "default"
            # in place: names, state dicts and checkpoints unchanged
            if cfg.model.compile_scope == "stack":
                model.compile_block_stack(mode=mode)
            else:
                model.compile_blocks(mode=mode)
            if self.rt.is_main:
                log.info("model.compile: %d blocks compiled with torch.compile (%s, mode %s)", len(model.blocks),
                         "the stack as one region" if cfg.model.compile_scope == "stack" else "regional", mode)
        self.engine = build_engine(model, cfg, self.rt,
                                   load_universal=self.resharding and reshard.uses_universal(cfg))
        self.engine.dig_grad_norm_wanted = self._logs_metrics_after_this_step
        self.checkpoints = self._make_checkpoint_writer()
        self.diffusion = create_diffusion(learn_sigma=cfg.model.learn_sigma)
        if cfg.model.compile and cfg.model.compile_loss:
            self.diffusion.compile_losses()

        self.step = 0
        self.nonfinite_total = 0
        self.nonfinite_in_a_row = 0
        torch.manual_seed(cfg.run.seed * 1_000_003 + 7919 * (self.rt.rank + 1))  # per-rank t, noise, dropout
        if resume_from is not None:
            self._resume(resume_from)
        else:
            self.ema = self._make_ema()  # = initial weights
        if cfg.engine.deepcompile:
            from .engine import compile_with_deepcompile

            compile_with_deepcompile(self.engine, cfg, self.rt)
        self.tracker = make_tracker(self.rt.is_main, self.run_dir, cfg, resolved, self.step,
                                    deepspeed_json=self.engine.config,
                                    tags={"dig.gla_dots_16bit": GLA_DOTS_16BIT})
        self.console = TrainingConsole(cfg, self.rt, self.accum, self.step, self.engine.module, self.tracker,
                                       precision="bf16" if self.rt.bf16 else "fp32")
        if self.rt.is_main:
            with open(os.path.join(self.run_dir, "config.json"), "w") as f:
                json.dump(resolved, f, indent=1)
        self._stop_requested = False  # set by the signal handler of this process
        self._stop_agreed = False     # some rank asked to stop, as of the last `agree`
        self._sample_model = None
        self._vae = None
        self._window = _MetricWindow()
        # the backward before the loss check needs a way to undo it: no ZeRO, fp32 weights, one micro-batch per step
        self._backward_first = cfg.engine.backward_before_loss_check and self.accum == 1 \
            and hasattr(self.engine, "dig_discard_gradients")
        self._stats_host: torch.Tensor | None = None  # pinned: the per-micro-batch stats read back
        self.host_pacing = HostPacing(cfg.host.gc_every, cfg.host.gil_switch_interval_ms)
        self._last_saved_step = self.step if resume_from is not None else -1
        self._checkpoint_block_s: float | None = None
        self.latest_saved: str | None = resume_from  # where `latest` points (local folder or s3://), once known

    # --- setup helpers --------------------------------------------------------------------------------------

    def _init_weights_from(self, source: str) -> dict:
        """Weights of an exported folder or a run/checkpoint (its EMA) to start from; adapts the position grid."""
        from safetensors.torch import load_file

        from .export import CONFIG_FILE, WEIGHTS_FILE

        if os.path.exists(os.path.join(source, CONFIG_FILE)):
            with open(os.path.join(source, CONFIG_FILE)) as f:
                src_kwargs = json.load(f)["model_kwargs"]
            state = load_file(os.path.join(source, WEIGHTS_FILE))
        else:
            try:
                ckpt = checkpoint.resolve_checkpoint(source)
            except FileNotFoundError as exc:
                raise ConfigError(f"model.init_from: {exc}") from None
            src_kwargs = checkpoint.load_trainer_meta(ckpt)["model_kwargs"]
            state = checkpoint.load_ema_full(ckpt)
        src_grid = src_kwargs.get("pos_embed_base_size") or src_kwargs["input_size"]
        if self.cfg.model.pos_embed_base_size is None and src_grid != self.model_kwargs["input_size"]:
            # the sin-cos grid is a fixed buffer: "interpolating" = scaling positions to the source's grid
            self.model_kwargs["pos_embed_base_size"] = src_grid
            if self.rt.is_main:
                log.info("init_from %s: latent %s -> %s, position grid scaled to base size %s", source,
                         src_kwargs["input_size"], self.model_kwargs["input_size"], src_grid)
        return state

    def _resumed_model_kwargs(self, ckpt: str) -> dict:
        """The architecture the run was started with (incl. a position grid set by init_from); only runtime
        options (activation checkpointing, the SwiGLU recompute, GLA backend, the norm-gate kernels, the depthwise
        conv's backward, the packed input projections, the SwiGLU kernels) may change on resume."""
        from dig.models import without_retired

        saved = without_retired(checkpoint.load_trainer_meta(ckpt)["model_kwargs"])
        runtime_keys = ("grad_checkpointing", "mlp_recompute", "gla_backend", "norm_gate_kernel",
                        "dw_conv_flipped_grad", "packed_projections", "mlp_kernel")
        current = {k: v for k, v in self.model_kwargs.items() if k not in runtime_keys}
        changed = {k: (saved.get(k), v) for k, v in current.items()
                   if saved.get(k) != v and not (k == "pos_embed_base_size" and self.cfg.model.pos_embed_base_size
                                                 is None)}
        if changed:
            raise ConfigError(f"cannot resume {ckpt}: the model changed since it was written "
                              f"(key: (checkpoint, now)): {changed}; start a new run.dir with model.init_from")
        saved.update({k: v for k, v in self.model_kwargs.items() if k in runtime_keys})
        return saved

    def _make_ema(self) -> ShardedEMA:
        stream = torch.cuda.Stream() if self.cfg.ema_side_stream and self.rt.device.type == "cuda" else None
        return ShardedEMA(self.engine.module, self.cfg.ema_decay, self.cfg.engine.zero_stage, stream=stream)

    def _lock_run_dir(self):
        """One trainer per run directory (and per remote checkpoint root): rank 0 takes the lock, every rank
        learns the outcome, a refusal names the holder."""
        from .run_lock import RunLockError, acquire_run_lock

        lock, error = None, None
        if self.rt.is_main:
            try:
                lock = acquire_run_lock(self.run_dir, self.cfg.checkpoint.uri, self.cfg.run.lock_lease_s)
            except RunLockError as exc:
                error = str(exc)
        if self.rt.world_size > 1:
            box = [error]
            dist.broadcast_object_list(box, src=0)
            error = box[0]
        if error:
            raise ConfigError(error)
        return lock

    @property
    def _checkpoint_root(self) -> str:
        return self.cfg.checkpoint.uri or os.path.join(self.run_dir, checkpoint.CHECKPOINTS)

    def _find_resume_checkpoint(self) -> str | None:
        """The local folder of the newest complete checkpoint (downloaded when the root is remote), after rank 0
        removed what an interrupted save left behind."""
        staging = os.path.join(self.run_dir, checkpoint.CHECKPOINTS)
        if self.rt.is_main:
            removed = clean_unfinished(self._checkpoint_root, staging)
            if removed:
                log.info("removed unfinished checkpoints of an interrupted run: %s", ", ".join(removed))
        if self.rt.world_size > 1:
            dist.barrier()
        found = fetch_latest(self._checkpoint_root, staging, self.rt.local_rank, self.cfg.checkpoint.upload_retries)
        if self.rt.world_size > 1:
            dist.barrier()  # remote checkpoints: every node's copy is complete
        return found

    def _make_checkpoint_writer(self) -> CheckpointWriter:
        c = self.cfg.checkpoint
        return CheckpointWriter(self._checkpoint_root, os.path.join(self.run_dir, checkpoint.CHECKPOINTS),
                                rank=self.rt.rank, world_size=self.rt.world_size, local_rank=self.rt.local_rank,
                                keep_last=c.keep_last, background=c.background, timeout_s=c.write_timeout_s,
                                upload_retries=c.upload_retries)

    def _resume(self, ckpt: str) -> None:
        if self.resharding:
            state = reshard.load_rank_state(ckpt, self.rt.rank, self.rt.world_size, self.data, self.cfg.run.seed)
            reshard.load_engine(self.engine, ckpt)
        else:
            state = checkpoint.load_rank_state(ckpt, self.rt.rank, self.rt.world_size)
            checkpoint.load_engine(self.engine, ckpt)
        self.ema = self._make_ema()
        self.ema.load_full(checkpoint.load_ema_full(ckpt))
        self.data.load_state_dict(state["data"])
        self.step = state["step"]
        self.nonfinite_total = state["nonfinite_total"]
        self.nonfinite_in_a_row = state["nonfinite_in_a_row"]
        checkpoint.set_rng_state(state["rng"])
        if self.rt.is_main:
            log.info("resumed from %s at step %d", ckpt, self.step)

    # --- the loop -------------------------------------------------------------------------------------------

    def fit(self) -> None:
        self._install_signal_handlers()
        status = "FAILED"
        try:
            self._window = _MetricWindow()
            with self.host_pacing:
                while self.step < self.cfg.steps and not self._should_stop():
                    self.run_step()
            self.save_checkpoint(wait=True)
            status = "FINISHED" if self.step >= self.cfg.steps else "KILLED"
        except TrainingAborted:
            status = "ABORTED"  # every rank took the same decision, so they can leave together
            raise
        except CheckpointWriteError as exc:
            status = "ABORTED"  # every rank got the same outcome from the checkpoint writer
            raise TrainingAborted(str(exc)) from exc
        finally:
            self.console.close(status, self.step, self.latest_saved)
            self.tracker.close("FAILED" if status == "ABORTED" else status)
            self.data.close()
            if self.run_lock is not None:
                self.run_lock.release()
            if status != "FAILED":
                shutdown()
        if status == "KILLED":
            latest = self.latest_saved or "none"
            raise TrainingStopped(f"stopped at step {self.step}; checkpoint {latest}; run the same command to resume")

    def run_step(self) -> None:
        """One optimizer step and everything due after it (EMA, metrics, sample grid, checkpoint)."""
        metrics = self.train_step()
        self.step += 1
        self.update_ema()
        self.host_pacing.step_done(self.step)
        self._window.add(metrics)
        self.console.step_done()
        self.maybe_log_metrics()   # before the checkpoint: a crash right after it loses no metrics
        self.maybe_log_samples()
        self.maybe_evaluate()
        self.maybe_checkpoint()

    def next_batch(self) -> Batch:
        return self.data.next_batch()

    def forward_loss(self, batch: Batch):
        """Diffusion loss of one micro-batch; returns (loss for backward, this rank's [loss, mse, vb, non-finite,
        stop requested] as a device tensor, for `agree`)."""
        if self._cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        x = batch.latents.to(self.rt.device, non_blocking=True)
        y = batch.labels.to(self.rt.device, non_blocking=True)
        t = torch.randint(0, self.diffusion.num_timesteps, (x.shape[0],), device=self.rt.device)
        with self.rt.autocast():
            terms = self.diffusion.training_losses(self.engine, x, t, model_kwargs=dict(y=y))
        loss = terms["loss"].float().mean()
        detached = loss.detach()
        stats = torch.stack([detached, terms["mse"].float().mean().detach(), terms["vb"].float().mean().detach(),
                             (~torch.isfinite(detached)).float(),
                             detached.new_full((), float(self._stop_requested))])  # a fill, not a host copy
        return loss, stats

    def share(self, stats: torch.Tensor) -> _SharedStats:
        """Queue the sum of `stats` over the ranks and its copy to the host behind the forward, without waiting
        for either (NCCL: the stream waits for the sum, not the host); `agree` reads it."""
        if self.rt.world_size > 1:
            dist.all_reduce(stats)
        if self.rt.device.type != "cuda":
            return _SharedStats(stats, None)
        if self._stats_host is None:
            self._stats_host = torch.empty(stats.shape, dtype=stats.dtype, pin_memory=True)
        self._stats_host.copy_(stats, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return _SharedStats(self._stats_host, ready)

    def agree(self, shared: _SharedStats) -> _StepStats:
        """Wait for `share`'s copy and read it: the trainer's one host sync per micro-batch. Every rank gets the
        same numbers, so all take the same decision on skipping a non-finite micro-batch and on stopping."""
        if shared.ready is not None:
            shared.ready.synchronize()  # the forward's end: work queued after the copy (the backward) goes on
        loss, mse, vb, nonfinite, stop = shared.values.tolist()
        n = self.rt.world_size
        if stop > 0:
            self._stop_agreed = True
        return _StepStats(loss / n, mse / n, vb / n, nonfinite > 0)

    def train_step(self) -> dict:
        """One optimizer step over `accum` finite micro-batches; non-finite ones are dropped and counted."""
        lr = self.engine.get_lr()[0]  # the rate this step uses (the scheduler moves on after it)
        loss_sum = mse_sum = vb_sum = 0.0
        keys: list[str] = []
        for _ in range(self.accum):
            batch, agreed = self.finite_micro_batch()
            self.ema.wait_for_update()  # the EMA (on its own stream) has read the weights the step changes
            self.engine.step()
            loss_sum, mse_sum, vb_sum = loss_sum + agreed.loss, mse_sum + agreed.mse, vb_sum + agreed.vb
            keys += batch.keys
        metrics = {"loss": loss_sum / self.accum, "mse": mse_sum / self.accum, "vb": vb_sum / self.accum, "lr": lr}
        if self.cfg.tracking.step_log:
            self._write_step_log(metrics, keys)
        return metrics

    def finite_micro_batch(self) -> tuple[Batch, _StepStats]:
        """The next micro-batch whose loss is finite on every rank, after its backward, and the agreed stats."""
        while True:
            batch = self.next_batch()
            loss, stats = self.forward_loss(batch)
            shared = self.share(stats)
            if self._backward_first:
                # queued right behind the forward and the stats' copy, so the GPU does not drain while the host
                # reads them; a micro-batch the ranks skip then drops the gradients it made
                self.engine.backward(loss)
                agreed = self.agree(shared)
                if agreed.nonfinite:
                    self.engine.dig_discard_gradients()
            else:
                agreed = self.agree(shared)
                if not agreed.nonfinite:
                    self.engine.backward(loss)
            if not agreed.nonfinite:
                self.nonfinite_in_a_row = 0
                return batch, agreed
            self.skip_nonfinite(batch)

    def skip_nonfinite(self, batch: Batch) -> None:
        self.nonfinite_total += 1
        self.nonfinite_in_a_row += 1
        log.warning("step %d: non-finite loss, batch skipped (%d in a row, %d in total); keys on rank %d: %s",
                    self.step + 1, self.nonfinite_in_a_row, self.nonfinite_total, self.rt.rank, batch.keys[:8])
        limit = self.cfg.max_nonfinite_in_a_row
        if self.nonfinite_in_a_row >= limit:
            raise TrainingAborted(
                f"aborting at step {self.step + 1}: {self.nonfinite_in_a_row} non-finite losses in a row "
                f"(max_nonfinite_in_a_row={limit}). Check the data (NaN/Inf latents: keys on rank "
                f"{self.rt.rank} of the last batch: {batch.keys[:8]}) or lower the learning rate; the last "
                f"checkpoint in {self.run_dir} is unaffected")

    def update_ema(self) -> None:
        self.ema.update()

    def maybe_checkpoint(self) -> None:
        self.collect_checkpoint()
        self.checkpoints.prepare(self.engine, self.ema)  # once, after the first step: the first save's buffers
        every = self.cfg.checkpoint.every
        if every > 0 and self.step % every == 0:
            t0 = time.perf_counter()
            self.save_checkpoint()
            self._checkpoint_block_s = time.perf_counter() - t0  # reported with the next metrics

    def collect_checkpoint(self) -> None:
        """Record a background save that completed; when one failed, ask every rank to stop (the request travels
        with the next step's statistics) so that all of them raise its error together at the final save.
        If another trainer took this run's lock over (our heartbeat stalled past the lease), stop at once,
        writing nothing more (rank 0 leaves; torchrun ends the others)."""
        if self.run_lock is not None and self.run_lock.lost:
            raise ConfigError(f"{self.run_lock.lost} while this one stalled; stopping without a checkpoint")
        try:
            saved = self.checkpoints.poll()
        except CheckpointWriteError as exc:
            if not self._stop_requested:
                log.error("stopping: %s", exc)
            self._stop_requested = True
            return
        if saved is not None:
            self._tag_checkpoint(saved)

    def _tag_checkpoint(self, saved) -> None:
        where = saved.location if saved.location.startswith("s3://") else os.path.abspath(saved.location)
        self.latest_saved = where
        self.tracker.checkpoint_saved(where, saved.step)

    def save_checkpoint(self, wait: bool = False) -> None:
        """Collective. Starts a save of this step (after the previous one completed) and, with `wait`, waits
        until it is complete and `latest` names it. Raises CheckpointWriteError on every rank if a save failed."""
        if self._last_saved_step != self.step:
            self._start_checkpoint()
        if wait:
            saved = self.checkpoints.wait()
            if saved is not None:
                self._tag_checkpoint(saved)

    def _start_checkpoint(self) -> None:
        previous = self.checkpoints.wait()  # at most one save in flight
        if previous is not None:
            self._tag_checkpoint(previous)
        meta = {
            "world_size": self.rt.world_size, "config": self.resolved, "model_name": self.cfg.model.name,
            "model_kwargs": self.model_kwargs, "latent_shape": self.latent_shape,
            "normalizer": self.data.normalizer.to_dict(), "vae": self.cfg.tracking.sample.vae
            or self.data.manifest.vae, "classes": self.data.manifest.classes,
            "mlflow_run_id": self.tracker.run_id,
        }
        rank_state = {"data": self.data.state_dict(), "nonfinite_total": self.nonfinite_total,
                      "nonfinite_in_a_row": self.nonfinite_in_a_row}
        self.checkpoints.save(self.step, self.engine, self.ema, rank_state, meta)
        self._last_saved_step = self.step
        if self.rt.is_main and self.checkpoints.background:
            log.info("step %d: checkpoint state copied in %.2fs; writing it in the background", self.step,
                     self.checkpoints.blocked_s[-1])

    def _logs_metrics_after_this_step(self) -> bool:
        every = self.cfg.tracking.log_every
        return every > 0 and (self.step + 1) % every == 0

    def maybe_log_metrics(self) -> None:
        every = self.cfg.tracking.log_every
        if every <= 0 or self.step % every:
            return
        w = self._window
        metrics = w.means()
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is not None:
            metrics["grad_norm"] = float(grad_norm)
        images_per_sec = w.steps * self.cfg.data.global_batch_size / max(w.elapsed(self.rt.device), 1e-9)
        metrics["img_per_sec"] = images_per_sec
        metrics["epoch"] = self.data.epoch
        metrics["nonfinite_skipped"] = self.nonfinite_total
        metrics["shards_skipped"] = self.data.shards_skipped
        metrics["samples_repeated"] = self.data.samples_repeated
        if self._checkpoint_block_s is not None:
            metrics["checkpoint_block_s"] = self._checkpoint_block_s
            self._checkpoint_block_s = None
        if self.rt.device.type == "cuda":
            peak = self._peak_flops()
            if peak:
                metrics["mfu"] = self.flops_per_image * images_per_sec / self.rt.world_size / peak
            metrics["gpu_mem_max_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
            torch.cuda.reset_peak_memory_stats()
        self.tracker.log_metrics(metrics, step=self.step)
        self.console.log_metrics(self.step, metrics)
        self._window = _MetricWindow(start=w.end)  # logging's own time counts in the next window

    def maybe_log_samples(self) -> None:
        every = self.cfg.tracking.sample_every
        if every <= 0 or self.step % every:
            return
        with self._window.paused(self.rt.device):
            self._log_samples()

    def _log_samples(self) -> None:
        ema = self.ema.full_state_dict()  # collective
        if not self.rt.is_main:
            return
        from dig.models import create_model
        from dig.vae import load_vae

        from dig.inference.grid import grid_labels, sample_grid

        s = self.cfg.tracking.sample
        # Building the model (random init) and sampling must not move the training RNG streams, or a resumed
        # run (which did not sample at the checkpoint step) would draw different timesteps and noise.
        with torch.random.fork_rng(devices=[self.rt.local_rank] if self.rt.device.type == "cuda" else []):
            if self._sample_model is None:
                self._sample_model = create_model(self.cfg.model.name, **self.model_kwargs).to(self.rt.device)
                self._vae = load_vae(s.vae or self.data.manifest.vae, device=self.rt.device)
            self._sample_model.load_state_dict(ema, strict=True)
            labels = grid_labels(s.num_images, len(self.data.manifest.classes))
            with self.rt.autocast():
                image = sample_grid(self._sample_model.eval(), self._vae, self.data.normalizer, labels,
                                    self.latent_shape, s.num_steps, s.method, s.cfg_scale, s.seed, self.rt.device,
                                    class_names=self.data.manifest.classes)
        self.tracker.log_samples(image, self.step)

    def maybe_evaluate(self) -> None:
        """FID etc. of the EMA weights every tracking.eval_every steps (dig/eval/during_training.py: all ranks
        sample, rank 0 logs). The evaluator is made at the first step, so a wrong reference path fails early."""
        every = self.cfg.tracking.eval_every
        if every <= 0:
            return
        if getattr(self, "_evaluator", None) is None:
            self._evaluator = TrainingEvaluator(
                self.cfg.tracking.eval, self.cfg.model.name, self.model_kwargs, self.latent_shape,
                self.data.normalizer, self.cfg.tracking.sample.vae or self.data.manifest.vae, self.rt.device,
                self.rt.rank, self.rt.world_size)
        if self.step % every:
            return
        with self._window.paused(self.rt.device):
            metrics = self._evaluator.evaluate(self.ema.full_state_dict())  # collective
        if metrics is not None:
            self.tracker.log_metrics(metrics, step=self.step)
            log.info("step %d eval %s", self.step, " ".join(f"{k[5:]}={v:.4g}" for k, v in metrics.items()))

    # --- plumbing -------------------------------------------------------------------------------------------

    def _peak_flops(self) -> float | None:
        if self.cfg.tracking.peak_tflops:
            return self.cfg.tracking.peak_tflops * 1e12
        name = torch.cuda.get_device_name(self.rt.device)
        for key, tflops in PEAK_BF16_TFLOPS.items():
            if key in name:
                return tflops * 1e12
        return None

    def _write_step_log(self, metrics: dict, keys: list[str]) -> None:
        folder = os.path.join(self.run_dir, "steps")
        os.makedirs(folder, exist_ok=True)
        record = {"step": self.step + 1, **metrics, "keys": keys}
        with open(os.path.join(folder, f"rank_{self.rt.rank:05d}.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")

    def _install_signal_handlers(self) -> None:
        def request_stop(signum, frame):
            self._stop_requested = True
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, request_stop)

    def _should_stop(self) -> bool:
        """All ranks stop together when any of them got SIGTERM/SIGINT (then a checkpoint is written). The request
        travels with the loss statistics (`agree`), so asking costs no collective: a request that came in before
        a step's last forward stops the run after that step, a later one after the next."""
        if self.rt.world_size == 1:
            return self._stop_requested
        return self._stop_agreed


class _SharedStats(NamedTuple):
    values: torch.Tensor             # on the host once `ready` has passed
    ready: torch.cuda.Event | None   # None: already there (CPU)


class _StepStats(NamedTuple):
    loss: float
    mse: float
    vb: float
    nonfinite: bool


def _device_clock(device: torch.device) -> float:
    """time.perf_counter() once the device has finished the work queued so far."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class _MetricWindow:
    """Metric sums over the steps since the last logged window, and the wall time they took."""

    def __init__(self, start: float | None = None):
        self.sums: dict[str, float] = {}
        self.steps = 0
        self.start = time.perf_counter() if start is None else start
        self.end: float | None = None

    def add(self, metrics: dict) -> None:
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.steps += 1

    def elapsed(self, device: torch.device) -> float:
        """Seconds from the window's start until the device finished its last step. The host runs up to a step
        ahead of the GPU, so only a synchronised clock counts the GPU's time (timing the host's calls once
        overstated img/s by 15 % when nothing else synchronised); one sync per logged window costs nothing."""
        self.end = _device_clock(device)
        return self.end - self.start

    @contextlib.contextmanager
    def paused(self, device: torch.device):
        """Work that is not training (sample grids, evaluation) is left out of the window's time."""
        t0 = _device_clock(device)
        try:
            yield
        finally:
            self.start += _device_clock(device) - t0

    def means(self) -> dict:
        return {k: v / max(self.steps, 1) for k, v in self.sums.items()}


# Layers applied once per image to the conditioning vector, not per token (the adaLN modulations, t embedder);
# the label embedder is a table lookup and costs nothing.
_PER_IMAGE = ("adaLN_modulation", "t_embedder")


def training_flops_per_image(model) -> float:
    """Training FLOPs per image (forward + backward = 3 x forward, 2 FLOPs per multiply-add): weights touched
    per token x tokens, per-image conditioning layers once, plus the token mixing: softmax attention's
    QK^T and AV (DiT, 2 T D MACs per token per block) or GLA's state update and read-out (DiG, about D^2 / H
    MACs per token per block). DiT-XL/2 at 256px gives 118.6 G MACs forward, the DiT paper's figure."""
    gh, gw = model.grid_size
    tokens = gh * gw
    per_token = per_image = 0
    for name, p in model.named_parameters():
        if p.dim() < 2 or "y_embedder" in name:
            continue
        if any(k in name for k in _PER_IMAGE):
            per_image += p.numel()
        else:
            per_token += p.numel()
    hidden, heads, depth = model.hidden_size, model.num_heads, len(model.blocks)
    softmax_attention = type(model).__name__ == "DiT"
    mixing = depth * (2 * tokens * hidden if softmax_attention else hidden * hidden / heads)
    macs = tokens * (per_token + mixing) + per_image
    return 3 * 2 * float(macs)


def train(cfg: TrainConfig, resolved: dict) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    filter_known_warnings()
    Trainer(cfg, resolved).fit()
