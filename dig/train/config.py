"""Training configuration: YAML (configs/train/*.yaml) + dotted `key=value` overrides → typed, validated objects.

OmegaConf reads the YAML and applies the overrides; pydantic turns the result into `TrainConfig`, rejecting
unknown keys and wrong types with the dotted path of the offending field. Checks that need the runtime (the
world size) or the data (the shards' manifest) live in `check_world` and `check_manifest` and are called by the
trainer before any work starts.
"""
from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dig.errors import UserError


class ConfigError(ValueError, UserError):
    """A configuration that cannot run, with a message saying which key and why."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class RunConfig(_Section):
    name: str = "dig"                      # MLflow run name prefix (the run gets "<name>-<UTC time>-<4 hex>")
    dir: str = "runs/dig"                  # run directory: resolved config, checkpoints, step logs
    seed: int = 0                          # weights init, data order and noise
    lock_lease_s: float = 60.0             # one trainer per run dir: a lock not refreshed this long is stale

    @field_validator("dir")
    @classmethod
    def _local_dir(cls, v):
        if v.startswith("s3://"):
            raise ValueError("run.dir must be a local or shared-filesystem folder (config, step logs, tracking); "
                             "put the checkpoints on S3 with checkpoint.uri=s3://bucket/prefix")
        return v


class ModelConfig(_Section):
    name: str = "DiG-XL/2"                 # a name from dig.models.list_models()
    num_classes: int = Field(1000, ge=1)   # label embedding rows (>= the dataset's classes)
    learn_sigma: bool = True               # learned-range variance (2x output channels), hybrid MSE + VLB loss
    class_dropout_prob: float = Field(0.1, ge=0.0, lt=1.0)  # label dropout for classifier-free guidance
    gla_backend: str = "auto"              # auto | triton | fla | torch (auto: Triton on CUDA, torch on CPU)
    scan_in_kernel: bool = False           # DiG: tokens stay in raster order, each block's GLA reads its scan direction in place (no copies between blocks; not U-DiG)
    grad_checkpointing: bool = False       # per-block activation checkpointing (high resolution)
    compile: bool = False                  # regional torch.compile of each block's forward (any ZeRO stage)
    compile_loss: bool = True              # with compile: also torch.compile the diffusion loss around the model (noising, MSE + VB terms)
    compile_scope: Literal["blocks", "stack"] = "blocks"  # with compile: a graph per block (any ZeRO stage), or the whole block stack as one (one CUDA graph each way; not ZeRO-3; 2 % slower on one H200, BENCHMARKS.md)
    compile_mode: Literal["default", "reduce-overhead", "max-autotune-no-cudagraphs"] = "default"  # torch.compile mode on CUDA; reduce-overhead adds CUDA graphs
    pos_embed_base_size: int | None = None  # latent side the sin-cos grid is scaled to (fine-tuning 256 → 1024)
    init_from: str | None = None           # exported folder or run directory whose (EMA) weights start this run
    overrides: dict[str, Any] = Field(default_factory=dict)  # extra create_model kwargs (depth, hidden_size, …)


class DataConfig(_Section):
    path: str                              # dataset folder (local or s3://), or a brace pattern of its shards
    resolution: int                        # image side in pixels; must match the shards' manifest
    global_batch_size: int = 256           # images per optimizer step over all ranks (= ranks x micro x accumulation)
    micro_batch_size: int = 32             # per rank, per forward
    shuffle_window_shards: int = 8         # shards loaded and shuffled together (memory ~ this many shards)
    latent_norm: Literal["scaling_factor", "stats"] = "scaling_factor"  # VAE factor or latent_stats.json mean/std
    random_flip: bool = True               # use the stored horizontal flip of each image half of the time
    read_retries: int = Field(3, ge=0)     # retries of a failed shard read before it counts as bad
    on_bad_shard: Literal["skip", "fail"] = "skip"  # an unreadable shard: skip it (counted in shards_skipped) or stop
    prefetch: bool = True                  # load shuffle windows in a background process, the next one ahead
    prefetch_batches: int = Field(4, ge=0)  # micro-batches cut ahead by a background thread (0: inline)

    @model_validator(mode="after")
    def _batches(self):
        if self.micro_batch_size < 1 or self.global_batch_size < 1:
            raise ValueError("data.global_batch_size and data.micro_batch_size must be >= 1")
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(f"data.global_batch_size={self.global_batch_size} is not a multiple of "
                             f"data.micro_batch_size={self.micro_batch_size}")
        if self.shuffle_window_shards < 1:
            raise ValueError("data.shuffle_window_shards must be >= 1")
        return self


class OptimConfig(_Section):
    lr: float = Field(1e-4, ge=0.0)        # AdamW learning rate (constant after warm-up)
    warmup_steps: int = Field(0, ge=0)     # linear warm-up from 0, then constant
    weight_decay: float = Field(0.0, ge=0.0)  # AdamW (decoupled) weight decay
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW betas
    eps: float = Field(1e-8, gt=0.0)       # AdamW epsilon
    grad_clip: float = Field(1.0, ge=0.0)  # max global grad norm; 0 disables

    @field_validator("betas")
    @classmethod
    def _betas(cls, v):
        if not all(0.0 <= b < 1.0 for b in v):
            raise ValueError(f"each beta must be in [0, 1), got {list(v)}")
        return v


class EngineConfig(_Section):
    zero_stage: Literal[0, 1, 2, 3] = 3    # DeepSpeed ZeRO stage (0: plain data parallel; 3 shards parameters)
    precision: Literal["auto", "bf16", "amp", "fp32"] = "auto"  # bf16: bf16 weights + fp32 master; amp: fp32 weights, bf16 autocast; auto: bf16 on GPU, fp32 on CPU
    deepspeed_config: str | None = "configs/deepspeed/zero.json"  # base knobs; the trainer fills the rest
    overlap_grad_allreduce: bool = True    # stage 0 with fp32 weights on >1 rank: all-reduce gradient buckets during the backward
    grad_bucket_mb: float = Field(100.0, gt=0)  # size of those buckets
    grad_allreduce_dtype: Literal["fp32", "bf16"] = "fp32"  # dtype gradients are summed over ranks in (bf16: half the bytes, bf16 rounding)
    cached_optimizer_step: bool = True     # stage 0 with fp32 weights: torch's fused AdamW kernel called with tensor lists built once, and gradients reset over a cached parameter list (false: torch's and DeepSpeed's own per-step Python)
    backward_before_loss_check: bool = True  # stage 0 with fp32 weights, one micro-batch per step: queue the backward before reading the loss back, so the GPU does not drain in between (a non-finite micro-batch then drops its gradients)
    deepcompile: bool = False              # CUDA, ZeRO 1-3, with model.compile=false: DeepSpeed's DeepCompile compiles the whole model with ZeRO's gathers and reductions inside the graph (experimental: DiG-XL/2 took almost 6 minutes to its third step, then 98.5 img/s against 149 for ZeRO-3 with CUDA-graphed blocks on one H200; BENCHMARKS.md)
    deepcompile_prefetch: bool = True      # with deepcompile and ZeRO-3: DeepCompile's profile-guided prefetch and selective-gather passes, which compile the model a second time after its warm-up steps (false: compile once, gathers where the weights are used)


class HostConfig(_Section):
    gc_every: int = Field(50, ge=0)        # automatic garbage collection off while training: a young-generation collection every this many steps (a full one every 20 of those); 0: Python's automatic GC
    gil_switch_interval_ms: float | None = Field(0.5, gt=0)  # CPython's GIL hand-over interval while training (Python's default: 5); None leaves it


class CheckpointConfig(_Section):
    every: int = Field(5000, ge=0)         # steps between checkpoints (one is also written at exit)
    keep_last: int = Field(3, ge=1)        # complete checkpoints kept; older ones are deleted
    uri: str | None = None                 # where checkpoints live: None = <run.dir>/checkpoints; a folder or
                                           # s3://bucket/prefix (staged in <run.dir>/checkpoints, uploaded)
    background: bool = True                # write/upload in a background thread; training waits only for the copy
    write_timeout_s: float = 3600.0        # how long ranks wait for each other's background write
    upload_retries: int = 5                # per file, on top of botocore's own retries

    @model_validator(mode="after")
    def _positive(self):
        if self.write_timeout_s <= 0 or self.upload_retries < 0:
            raise ValueError("checkpoint.write_timeout_s must be > 0 and checkpoint.upload_retries >= 0")
        return self


class SampleConfig(_Section):
    num_images: int = Field(16, ge=1)      # samples per grid (labels spread over the classes)
    num_steps: int = Field(50, ge=1)       # diffusion sampling steps
    method: Literal["ddpm", "ddim"] = "ddim"  # sampler
    cfg_scale: float = 4.0                 # classifier-free guidance scale (1: none)
    vae: str | None = None                 # VAE spec for decoding; default: the manifest's
    seed: int = 0                          # noise seed of the grids (the same every time: grids compare across steps)


class EvalConfig(_Section):
    """FID during training (dig.eval.during_training): the ADM numbers of `num_samples` EMA samples."""
    num_samples: int = 5000                # spread over all ranks; samples depend on (seed, index) only
    batch_size: int = 32                   # per rank
    num_steps: int = 250                   # diffusion sampling steps (the release's FID sampler: 250 DDPM)
    method: Literal["ddpm", "ddim"] = "ddpm"  # sampler
    cfg_scale: float = 1.0                 # the release's FID sampler; the paper's guided numbers use 1.5
    seed: int = 0                          # sample i depends on (seed, i) only, as in `dig sample --out X.npz`
    ref: str | None = None                 # reference batch .npz (arr_0 uint8 NHWC), e.g. VIRTUAL_imagenet256_labeled
    inception: str | None = None           # pt_inception-2015-12-05-6726825d.pth; None: $DIG_INCEPTION
    random_inception: bool = False         # tests only: random Inception weights, meaningless numbers
    use_ref_stats: bool = True             # use mu/sigma stored in the reference batch when it has them

    @model_validator(mode="after")
    def _counts(self):
        if self.num_samples < 4 or self.batch_size < 1 or self.num_steps < 2:
            raise ValueError("tracking.eval needs num_samples >= 4 (precision/recall use 3 neighbours), "
                             "batch_size >= 1 and num_steps >= 2")
        return self


class TrackingConfig(_Section):
    backend: Literal["mlflow", "jsonl", "none"] = "mlflow"  # jsonl: <run dir>/metrics.jsonl, for hosts without MLflow
    uri: str | None = None                 # None: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db
    experiment: str = "dig"                # MLflow experiment name
    log_every: int = Field(100, ge=0)      # steps between metric logs and console progress lines
    sample_every: int = Field(10000, ge=0)  # 0 disables sample grids
    sample: SampleConfig = Field(default_factory=SampleConfig)
    eval_every: int = 0                    # steps between FID evaluations of the EMA weights (0: off)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    peak_tflops: float | None = None       # per GPU, for MFU; None: looked up from the GPU name
    step_log: bool = False                 # <run dir>/steps/rank_*.jsonl: every step's losses and sample keys
    system_metrics: bool = True            # MLflow's system metrics (CPU, memory, network, GPU via nvidia-ml-py)
    system_metrics_interval: float = 10.0  # seconds between system-metric samples
    log_model: bool = True                 # at the end of a finished run, log the EMA export as `model/` artifacts


class TrainConfig(_Section):
    run: RunConfig = Field(default_factory=RunConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig
    optim: OptimConfig = Field(default_factory=OptimConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    host: HostConfig = Field(default_factory=HostConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    steps: int = Field(1000, ge=0)         # optimizer steps of the whole run (a resumed run continues to this)
    ema_decay: float = 0.9999              # EMA of the weights, updated every step
    ema_side_stream: bool = True           # CUDA: the EMA update on a stream of its own, beside the next step's forward (same bits; +1.2–1.4 % img/s for DiG-XL/2 at 32 images, BENCHMARKS.md)
    max_nonfinite_in_a_row: int = Field(10, ge=1)  # abort after this many consecutive non-finite losses

    @field_validator("ema_decay")
    @classmethod
    def _decay(cls, v):
        if not 0.0 <= v < 1.0:
            raise ValueError("ema_decay must be in [0, 1)")
        return v

    @model_validator(mode="after")
    def _model_known(self):
        from dig.models import allowed_overrides, list_models

        known = list_models()
        if self.model.name not in known:
            raise ValueError(f"unknown model {self.model.name!r}; known: {', '.join(known)}")
        allowed = set(allowed_overrides(self.model.name))
        unknown = sorted(set(self.model.overrides) - allowed)
        if unknown:
            raise ValueError(f"model.overrides {unknown} are not options of {self.model.name}; "
                             f"allowed: {', '.join(sorted(allowed))}")
        if self.model.scan_in_kernel and not self.model.name.startswith("DiG"):
            raise ValueError(f"model.scan_in_kernel applies to DiG models (not U-DiG or DiT); got {self.model.name}")
        if self.engine.deepcompile and (self.model.compile or self.engine.zero_stage == 0):
            raise ValueError("engine.deepcompile compiles the whole model itself under ZeRO stage 1, 2 or 3: set "
                             "model.compile=false and engine.zero_stage to 1, 2 or 3")
        if not self.engine.deepcompile_prefetch and not (self.engine.deepcompile and self.engine.zero_stage == 3):
            raise ValueError("engine.deepcompile_prefetch=false applies to engine.deepcompile=true with "
                             "engine.zero_stage=3")
        if self.model.compile and self.model.compile_scope == "stack" and self.engine.zero_stage == 3:
            raise ValueError("model.compile_scope=stack compiles all blocks as one region, but ZeRO-3 gathers each "
                             "block's weights in hooks around it; use model.compile_scope=blocks with ZeRO-3")
        if self.model.compile and self.model.compile_scope == "stack" and self.model.grad_checkpointing:
            raise ValueError("model.compile_scope=stack with model.grad_checkpointing: dynamo does not compile the "
                             "checkpointed blocks inside one region (they would run eagerly); use "
                             "model.compile_scope=blocks, which checkpoints each compiled block")
        return self

    @model_validator(mode="after")
    def _eval_has_reference(self):
        if self.tracking.eval_every > 0 and not self.tracking.eval.ref:
            raise ValueError("tracking.eval_every > 0 needs tracking.eval.ref (a reference batch .npz, e.g. ADM's "
                             "VIRTUAL_imagenet256_labeled.npz); or set tracking.eval_every=0")
        return self

    # --- checks needing the runtime or the data -------------------------------------------------------------

    def grad_accum_steps(self, world_size: int) -> int:
        per_step = world_size * self.data.micro_batch_size
        if self.data.global_batch_size % per_step:
            raise ConfigError(
                f"data.global_batch_size={self.data.global_batch_size} is not divisible by world size "
                f"{world_size} x data.micro_batch_size={self.data.micro_batch_size} (= {per_step})")
        return self.data.global_batch_size // per_step

    def check_world(self, world_size: int) -> None:
        self.grad_accum_steps(world_size)

    def check_manifest(self, manifest) -> None:
        if manifest.resolution != self.data.resolution:
            raise ConfigError(f"data.resolution={self.data.resolution} but the shards at {self.data.path} hold "
                              f"{manifest.resolution}px latents (latent {manifest.latent_size}x"
                              f"{manifest.latent_size}); pick the matching dataset or resolution")
        if self.model.num_classes < len(manifest.classes):
            raise ConfigError(f"model.num_classes={self.model.num_classes} but the dataset has "
                              f"{len(manifest.classes)} classes")
        in_ch = self.model.overrides.get("in_channels", 4)
        if manifest.latent_channels != in_ch:
            raise ConfigError(f"the shards hold {manifest.latent_channels}-channel latents but the model takes "
                              f"{in_ch} (model.overrides.in_channels)")

    def model_kwargs(self, latent_size: int) -> dict[str, Any]:
        """create_model overrides for this run (latent side from the data)."""
        from dig.models import allowed_overrides

        kw = dict(input_size=latent_size, num_classes=self.model.num_classes, learn_sigma=self.model.learn_sigma,
                  class_dropout_prob=self.model.class_dropout_prob, grad_checkpointing=self.model.grad_checkpointing)
        if "gla_backend" in allowed_overrides(self.model.name):
            kw["gla_backend"] = self.model.gla_backend
        if self.model.scan_in_kernel:
            kw["scan_in_kernel"] = True
        if self.model.pos_embed_base_size is not None:
            kw["pos_embed_base_size"] = self.model.pos_embed_base_size
        kw.update(self.model.overrides)
        return kw


def _format_errors(exc: ValidationError, source: str) -> str:
    lines = [f"invalid training config ({source}):"]
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "<top>"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "missing":
            msg = "required key is missing"
        lines.append(f"  {where}: {msg}")
    return "\n".join(lines)


def resolve(path: str | None = None, overrides: list[str] | tuple[str, ...] = (),
            base: dict | None = None) -> dict:
    """YAML file (optional) merged with `base` and the dotted overrides, as a plain resolved dict."""
    from omegaconf import OmegaConf

    parts = []
    if base is not None:
        parts.append(OmegaConf.create(base))
    if path is not None:
        if not os.path.exists(path):
            raise ConfigError(f"config file {path} does not exist")
        parts.append(OmegaConf.load(path))
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"overrides must look like key=value (dotted keys), got {bad}")
    if overrides:
        parts.append(OmegaConf.from_dotlist(list(overrides)))
    merged = OmegaConf.merge(*parts) if parts else OmegaConf.create({})
    return OmegaConf.to_container(merged, resolve=True)


def validate(data: dict, source: str = "<dict>") -> TrainConfig:
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, source)) from None


def load_config(path: str | None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """`dig train --config PATH key=value …` → a validated TrainConfig."""
    return validate(resolve(path, overrides), source=path or "<overrides>")


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """Nested dict → {"a.b.c": value}; the form MLflow params take."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
