"""DeepSpeed: process group, device, precision and the engine (ZeRO stage, AdamW, grad clipping, lr schedule).

The model stays a plain single-device nn.Module; everything about parallelism and precision is decided here
from the typed config. On a machine without CUDA DeepSpeed's CPU accelerator is used over gloo (set
DS_ACCELERATOR=cpu before deepspeed is imported: `setup_environment` does it) and training runs in fp32.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass

import torch

from .config import ConfigError, TrainConfig
from .deepspeed_json import merge_deepspeed_json

log = logging.getLogger("dig.train")


@dataclass
class Runtime:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    bf16: bool                # the forward runs under bf16 autocast
    bf16_weights: bool | None = None  # DeepSpeed keeps bf16 module weights (+ fp32 master in the optimizer);
                                      # False: fp32 weights throughout ("amp"). None: same as bf16

    def __post_init__(self):
        if self.bf16_weights is None:
            self.bf16_weights = self.bf16

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self):
        """bf16 autocast around the forward (params are bf16 in the engine, inputs and embeddings are fp32)."""
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)


def free_loopback_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_environment() -> None:
    """Defaults for a single process started without a launcher, and the CPU accelerator without CUDA."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_loopback_port()))
    os.environ.setdefault("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", "1"))  # DeepSpeed's CPU comm reads it


def init_distributed(cfg: TrainConfig) -> Runtime:
    setup_environment()
    import deepspeed

    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local_rank)
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    import torch.distributed as dist

    if not cuda:
        unlink_cpu_allreduce_workspace()

    precision = cfg.engine.precision
    bf16 = cuda if precision == "auto" else precision in ("bf16", "amp")
    return Runtime(rank=dist.get_rank(), local_rank=local_rank, world_size=dist.get_world_size(),
                   device=torch.device("cuda", local_rank) if cuda else torch.device("cpu"), bf16=bf16,
                   bf16_weights=bf16 and precision != "amp")


def unlink_cpu_allreduce_workspace() -> None:
    """DeepSpeed's CPU all-reduce keeps a 66 MB workspace per rank in /dev/shm and never removes it: every CPU
    run left one per rank behind until /dev/shm (and with it the machine's memory) was full. Once every rank has
    passed init_distributed, each has mapped all the others' workspaces, so the names can go; the memory itself
    is freed when the processes end, however they end."""
    import torch.distributed as dist

    dist.barrier()
    name = (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{dist.get_rank()}")
    try:
        os.unlink(name)
    except FileNotFoundError:  # ranks on several machines: DeepSpeed made no workspace
        pass


def _find_config_file(path: str) -> str:
    """A path as given, else relative to the source checkout (configs/ ships beside the dig package)."""
    if os.path.isabs(path) or os.path.exists(path):
        return path
    in_checkout = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), path)
    if os.path.exists(in_checkout):
        return in_checkout
    raise FileNotFoundError(f"engine.deepspeed_config: {path} not found (relative to {os.getcwd()} or the checkout)")


def deepspeed_config(cfg: TrainConfig, runtime: Runtime, load_universal: bool = False) -> dict:
    """The DeepSpeed JSON: base knobs from engine.deepspeed_config, everything the run decides filled in.
    `load_universal`: the engine will load a universal checkpoint (resume on another world size, reshard.py)."""
    base: dict = {}
    if cfg.engine.deepspeed_config:
        with open(_find_config_file(cfg.engine.deepspeed_config)) as f:
            base = json.load(f)
    zero = dict(base.get("zero_optimization", {}))
    zero["stage"] = cfg.engine.zero_stage
    if cfg.engine.zero_stage < 3:
        zero = {k: v for k, v in zero.items() if not k.startswith("stage3_")}
    if runtime.world_size == 1:
        # Nothing to overlap with one rank, and overlapping costs host syncs: ZeRO-2 synchronises the device per
        # reduce bucket and at the end of every backward when overlap_comm is on.
        zero["overlap_comm"] = False
    o = cfg.optim
    merged = merge_deepspeed_json(base, {  # a user value that conflicts with the training config is an error
        "train_batch_size": cfg.data.global_batch_size,
        "train_micro_batch_size_per_gpu": cfg.data.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum_steps(runtime.world_size),
        # torch's AdamW: DeepSpeed's fused/CPU Adam would be compiled at start-up. Its fused kernel: one pass over
        # the fp32 master partition (the default foreach path makes ~10); the CPU has one too.
        "optimizer": {"type": "AdamW", "params": {"lr": o.lr, "betas": list(o.betas), "eps": o.eps,
                                                  "weight_decay": o.weight_decay, "torch_adam": True,
                                                  "fused": True}},
        # fp32 weights without ZeRO: we clip ourselves (clip_without_zero); DeepSpeed's clipping there launches a
        # norm per parameter and an all-reduce, ~15 ms of host time per step for DiG-XL/2.
        "gradient_clipping": 0.0 if _own_clipping(cfg, runtime) else o.grad_clip,
        "bf16": {"enabled": runtime.bf16_weights},
        # The forward runs under bf16 autocast (Runtime.autocast). Without this section DeepSpeed's engine.forward
        # turns an enclosing CUDA autocast *off* ("enabled outside DeepSpeed but disabled within"), and fp32
        # inputs meet bf16 weights. (CPU runs never saw it: that check only looks at CUDA autocast.)
        "torch_autocast": {"enabled": runtime.bf16, "dtype": "bfloat16"},
        "fp16": {"enabled": False},
        "zero_optimization": zero,
        "communication_data_type": "bf16" if cfg.engine.grad_allreduce_dtype == "bf16" else None,
        "steps_per_print": 10 ** 12,
        "wall_clock_breakdown": False,
        # DeepSpeed's throughput timer is on by default and synchronises the device at every engine.forward and
        # engine.step: twice a step the GPU drains its queue and then idles while the host launches the next
        # kernels. The trainer measures img/s itself.
        "timers": {"throughput": {"enabled": False}},
        "compile": {**base.get("compile", {}), "deepcompile": cfg.engine.deepcompile},  # as zero_optimization
    })
    if cfg.engine.deepcompile:
        offloads = [f"compile.{k}" for k, v in merged.get("compile", {}).items() if k.startswith("offload") and v]
        offloads += [f"zero_optimization.{k}" for k, v in merged["zero_optimization"].items()
                     if k.startswith("offload") and isinstance(v, dict) and v.get("device", "none") != "none"]
        if offloads:
            raise ConfigError(f"engine.deepcompile with DeepCompile's offloading ({', '.join(offloads)} in "
                              f"{cfg.engine.deepspeed_config}) is not supported: it moves the fp32 master weights "
                              "the EMA reads in place; remove those keys or set engine.deepcompile=false")
    if load_universal:
        merged["checkpoint"] = {**merged.get("checkpoint", {}), "load_universal": True}
    return merged


def warmup_then_constant(warmup_steps: int):
    """lr multiplier for optimizer step i (0-based): (i+1)/warmup during warm-up, then 1."""
    def factor(i: int) -> float:
        return 1.0 if warmup_steps <= 0 else min(1.0, (i + 1) / warmup_steps)
    return factor


def zero3_leaf_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The units ZeRO-3 gathers and releases whole: the blocks of the model's block lists. ZeRO-3 otherwise runs
    its Python gather/release and gradient hooks around every submodule and parameter (about 20 modules per DiG
    block: projections, low-rank gate, norms, ...), which costs more host time than the GPU spends on those small
    layers; a whole block is at most a few tens of MB of bf16 weights. The embedders stay as they are: DeepSpeed
    0.19 does not re-gather a leaf's weights for the backward when none of the leaf's inputs needs a gradient."""
    return [block for child in model.children() if isinstance(child, torch.nn.ModuleList) for block in child]


def build_engine(model: torch.nn.Module, cfg: TrainConfig, runtime: Runtime, load_universal: bool = False):
    import deepspeed

    if cfg.engine.deepcompile:
        from deepspeed.compile.util import is_deepcompile_supported

        if not is_deepcompile_supported():
            raise ConfigError("engine.deepcompile needs CUDA and torch >= 2.6 (DeepSpeed's DeepCompile)")
    if cfg.engine.zero_stage == 3 and not cfg.engine.deepcompile:
        from deepspeed.utils import set_z3_leaf_module

        leaves = zero3_leaf_modules(model)
        for module in leaves:
            set_z3_leaf_module(module, True)
        if runtime.is_main:
            log.info("ZeRO-3: %d blocks gathered whole (DeepSpeed leaf modules)", len(leaves))

    def scheduler(optimizer):
        return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_then_constant(cfg.optim.warmup_steps))

    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters()
                                                                            if p.requires_grad],
                                           config=deepspeed_config(cfg, runtime, load_universal),
                                           lr_scheduler=scheduler)
    if _own_clipping(cfg, runtime):
        reducer = None
        if runtime.world_size == 1:
            # Nothing to reduce, but DeepSpeed's stage 0 would still flatten every gradient into one buffer,
            # "all-reduce" it and copy it back parameter by parameter (2 x 2.7 GB and ~600 copies for DiG-XL/2).
            engine.enable_backward_allreduce = False
        elif cfg.engine.overlap_grad_allreduce:
            from .grad_allreduce import OverlappedGradAllReduce

            reducer = OverlappedGradAllReduce(engine.module.parameters(), engine.is_gradient_accumulation_boundary,
                                              bucket_mb=cfg.engine.grad_bucket_mb,
                                              comm_dtype={"fp32": None, "bf16": torch.bfloat16}[
                                                  cfg.engine.grad_allreduce_dtype])
            engine.enable_backward_allreduce = False  # the reducer's buckets replace DeepSpeed's reduce-after-backward
            engine.dig_grad_reducer = reducer
        clip_without_zero(engine, cfg.optim.grad_clip, reducer)
        if cfg.engine.cached_optimizer_step:
            from .optimizer_step import CachedFusedAdamW

            if CachedFusedAdamW.install(engine.optimizer) is not None and runtime.is_main:
                log.info("engine.cached_optimizer_step: torch's fused AdamW kernel with tensor lists built once")
            params = list(engine.module.parameters())

            def zero_grad():  # DeepSpeed's walks named_parameters() every step (~1.5 ms of host time)
                for p in params:
                    p.grad = None
            engine.zero_grad = zero_grad
        engine.dig_discard_gradients = lambda: discard_gradients(engine, reducer)
    return engine


def deepcompile_schedule(zero_stage: int, prefetch: bool, start_step: int) -> list:
    """DeepCompile's pass schedule as DeepSpeed 0.19 builds it by default, but from `start_step`: DeepSpeed starts
    a schedule only when the engine's step equals its first entry, so a resumed run (whose engine step is the
    checkpoint's) needs its own. ZeRO-1/2: the gradient-reduction pass. ZeRO-3: the gather/release pass, and with
    `prefetch` the profile-guided prefetch and selective-gather passes from the warm-up step on (a second compile)."""
    if zero_stage in (1, 2):
        from deepspeed.compile.passes import zero_1_and_2_compile as z12

        return [(start_step, [z12.add_z2_reduce if zero_stage == 2 else z12.add_z1_reduce])]
    from deepspeed.compile.init_z3 import WARMUP  # the steps DeepSpeed profiles before it plans prefetching
    from deepspeed.compile.passes import prefetch as prefetch_pass, selective_gather, zero3_compile

    schedule = [(start_step, [zero3_compile.add_z3_gather_release])]
    if prefetch:
        schedule.append((start_step + WARMUP, [
            zero3_compile.add_z3_gather_release, prefetch_pass.schedule_prefetch, selective_gather.selective_gather]))
    return schedule


def compile_with_deepcompile(engine, cfg: TrainConfig, runtime: Runtime) -> None:
    """engine.deepcompile: hand the model to DeepSpeed's DeepCompile, once the engine holds its state (after a
    resume, its step is the checkpoint's). The compile itself happens at the next forward."""
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if arch_list and arch_list != deepspeed_arch_list(arch_list):
        # DeepCompile builds its C++/CUDA op inside engine.compile(); DeepSpeed's builder reads every entry as numbers
        os.environ["TORCH_CUDA_ARCH_LIST"] = deepspeed_arch_list(arch_list)
        if runtime.is_main:
            log.info("engine.deepcompile: TORCH_CUDA_ARCH_LIST %r read as %r for DeepSpeed's op builder",
                     arch_list, os.environ["TORCH_CUDA_ARCH_LIST"])
    try:
        engine.compile(backend="inductor", schedule=deepcompile_schedule(
            cfg.engine.zero_stage, cfg.engine.deepcompile_prefetch, engine.global_steps))
    finally:
        if arch_list is not None:
            os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
    if runtime.is_main:
        plan = "the gradient-reduction pass" if cfg.engine.zero_stage < 3 else (
            "gathers, then prefetching planned after its warm-up steps (a second compile)"
            if cfg.engine.deepcompile_prefetch else "gathers, compiled once")
        log.info("engine.deepcompile: DeepSpeed's DeepCompile compiles the whole model at the next step (ZeRO-%d, "
                 "%s); expect minutes", cfg.engine.zero_stage, plan)


def deepspeed_arch_list(arch_list: str) -> str:
    """TORCH_CUDA_ARCH_LIST as DeepSpeed 0.19's op builder can parse it: architecture-specific suffixes dropped
    ('9.0a' -> '9.0', '10.0f' -> '10.0'; the builder fails on them with "invalid literal for int()"), '+PTX' kept,
    duplicates removed, entries separated by ';'."""
    entries = []
    for entry in arch_list.replace(" ", ";").split(";"):
        cc, plus, ptx = entry.strip().partition("+")
        if not cc:
            continue
        cc = ".".join(part.rstrip("abcdefghijklmnopqrstuvwxyz") for part in cc.split("."))
        if cc + plus + ptx not in entries:
            entries.append(cc + plus + ptx)
    return ";".join(entries)


def discard_gradients(engine, reducer=None) -> None:
    """Forget the gradients of a backward whose micro-batch the ranks agreed to skip (no ZeRO, fp32 weights, one
    micro-batch per step: before it every .grad was None). With a `reducer`, its exchange is completed first, as
    every rank's hooks launched it."""
    if reducer is not None:
        reducer.finish()
    engine.zero_grad()
    if reducer is not None:
        reducer.release()


def _own_clipping(cfg: TrainConfig, runtime: Runtime) -> bool:
    """No ZeRO and no bf16 weights: DeepSpeed's step is then the plain torch optimizer's (with bf16 weights its
    BF16_Optimizer keeps fp32 gradients of its own, which it clips itself)."""
    return cfg.engine.zero_stage == 0 and not runtime.bf16_weights


def clip_without_zero(engine, max_norm: float, reducer=None) -> None:
    """Without ZeRO, DeepSpeed's engine.step is the torch optimizer's step: clip the (already all-reduced)
    gradients first with torch's foreach clipping (a few fused kernels, no host sync) and keep the norm for
    get_global_grad_norm. Without clipping the norm is computed only for the steps whose metrics are logged
    when the trainer says which (`engine.dig_grad_norm_wanted`, a callable); it reads every gradient.
    With a `reducer` (grad_allreduce.py), its exchange is finished first."""
    params = [p for p in engine.module.parameters() if p.requires_grad]
    step = engine.step
    engine._dig_grad_norm = None
    engine.dig_grad_norm_wanted = None

    def clip_then_step(*args, **kwargs):
        if engine.is_gradient_accumulation_boundary():
            if reducer is not None:
                reducer.finish()
            wanted = engine.dig_grad_norm_wanted
            norm = None
            if max_norm > 0 or wanted is None or wanted():
                grads = [p.grad for p in params if p.grad is not None]
                norm = torch.nn.utils.get_total_norm(grads, foreach=True)
            if max_norm > 0:
                torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm, foreach=True)
            engine._dig_grad_norm = norm
            out = step(*args, **kwargs)
            if reducer is not None:
                reducer.release()
            return out
        return step(*args, **kwargs)

    engine.step = clip_then_step
    engine.get_global_grad_norm = lambda: engine._dig_grad_norm


def shutdown() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
