"""The user's DeepSpeed JSON (`engine.deepspeed_config`) merged with what the training config decides.

The training config owns the keys in `OWNED`: batch sizes, optimizer, lr schedule, precision, gradient clipping
and the ZeRO stage. The user's JSON may leave them out, repeat the same value, or add sub-keys the trainer does
not set (e.g. `bf16.immediate_grad_update`); a *different* value is an error that names both values and the
training-config key to change, never silently replaced. Everything else in the JSON (ZeRO buckets, offload,
communication, ...) passes through, except `zero_optimization.stage3_*` when the stage is below 3 (DeepSpeed
ignores them there) and the cosmetic keys in `TRAINER_DEFAULTS`, where the user's value wins.
"""
from __future__ import annotations

import json
import logging
from typing import Any

from .config import ConfigError

log = logging.getLogger("dig.train")

# DeepSpeed key (dotted) -> the training-config key(s) that decide it. README's DeepSpeed section lists these.
OWNED: dict[str, str] = {
    "train_batch_size": "data.global_batch_size",
    "train_micro_batch_size_per_gpu": "data.micro_batch_size",
    "gradient_accumulation_steps": "data.global_batch_size / (world size x data.micro_batch_size)",
    "optimizer": "optim.lr, optim.betas, optim.eps, optim.weight_decay (torch AdamW)",
    "scheduler": "optim.warmup_steps (linear warm-up, then constant)",
    "gradient_clipping": "optim.grad_clip",
    "bf16": "engine.precision",
    "fp16": "engine.precision (fp16 is not offered: bf16 or fp32)",
    "torch_autocast": "engine.precision",
    "zero_optimization.stage": "engine.zero_stage",
    "communication_data_type": "engine.grad_allreduce_dtype (bf16; null = DeepSpeed's default for fp32)",
    "compile.deepcompile": "engine.deepcompile",
}
# Set by the trainer only when the user's JSON does not say otherwise.
TRAINER_DEFAULTS = ("steps_per_print", "wall_clock_breakdown", "timers")


def _conflicts(user: Any, ours: Any, path: str) -> list[tuple[str, Any, Any]]:
    """Leaves where both set a value and the values differ (dicts compared key by key)."""
    if isinstance(user, dict) and isinstance(ours, dict):
        out = []
        for k in user.keys() & ours.keys():
            out += _conflicts(user[k], ours[k], f"{path}.{k}")
        return out
    if isinstance(user, (list, tuple)) and isinstance(ours, (list, tuple)):
        same = len(user) == len(ours) and all(not _conflicts(a, b, path) for a, b in zip(user, ours))
        return [] if same else [(path, user, ours)]
    if isinstance(user, bool) or isinstance(ours, bool):
        same = user is ours
    else:
        same = user == ours  # 1 == 1.0: a number written either way is the same value
    return [] if same else [(path, user, ours)]


def _deep_merge(user: Any, ours: Any) -> Any:
    if isinstance(user, dict) and isinstance(ours, dict):
        return {**user, **{k: _deep_merge(user[k], v) if k in user else v for k, v in ours.items()}}
    return ours


def _owner(path: str) -> str:
    for key, owner in OWNED.items():
        if path == key or path.startswith(key + "."):
            return owner
    return "the trainer"


def merge_deepspeed_json(user: dict, decided: dict, source: str = "engine.deepspeed_config") -> dict:
    """`user`: the JSON as loaded from the file. `decided`: what the trainer computed from the training config
    (the owned keys, `zero_optimization` as the trainer derived it from the user's, and the trainer defaults).
    Returns the final DeepSpeed config; raises ConfigError listing every conflicting value."""
    conflicts = []
    for key in OWNED:
        section, _, sub = key.partition(".")
        if section not in user or (sub and sub not in user[section]):
            continue
        if key == "scheduler":  # the trainer passes its own lr scheduler object; any JSON scheduler conflicts
            conflicts.append((key, user[key], "its own LambdaLR"))
            continue
        if section not in decided:
            continue
        u, d = (user[section], decided[section]) if not sub else (user[section][sub], decided[section].get(sub))
        conflicts += _conflicts(u, d, key)
    if conflicts:
        lines = [f"{source} conflicts with the training config (these DeepSpeed keys are set from it; remove them "
                 "from the JSON or change the training-config key):"]
        for path, u, d in conflicts:
            lines.append(f"  {path}: JSON has {json.dumps(u, default=str)}, training config gives "
                         f"{json.dumps(d, default=str)} (from {_owner(path)})")
        raise ConfigError("\n".join(lines))

    final = dict(user)
    for key, value in decided.items():
        if key in TRAINER_DEFAULTS and key in user:
            continue
        final[key] = _deep_merge(user[key], value) if key in OWNED and key in user else value
    zero_user, zero_final = user.get("zero_optimization", {}), final.get("zero_optimization", {})
    adjusted = {k: (v, zero_final[k]) for k, v in zero_user.items()
                if k in zero_final and k != "stage" and zero_final[k] != v}
    if adjusted:
        log.info("DeepSpeed zero_optimization adjusted for this run (key: (JSON, used)): %s", adjusted)
    return final
