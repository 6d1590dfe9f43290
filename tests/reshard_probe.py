"""`dig train` (same arguments) that also writes the whole training state the engine holds, gathered through
DeepSpeed's own per-parameter getters, to $PROBE_DIR: right after a resume (`resumed_step<S>_world<W>.pt`) and
after the final checkpoint (`final_step<S>_world<W>.pt`). Started by tests/test_train_reshard.py with torchrun.
PROBE_TRACKING=none: no MLflow (the GPU machine has none installed)."""
from __future__ import annotations

import os
import sys

import torch


def engine_state(trainer) -> dict:
    """Collective: every rank calls it. Full fp32 weights, Adam moments, optimizer/lr/engine step counters, EMA."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    engine = trainer.engine
    out = {"weights": {}, "exp_avg": {}, "exp_avg_sq": {}}
    for name, p in engine.module.named_parameters():
        out["weights"][name] = safe_get_full_fp32_param(p).detach().cpu().clone()
        for key in ("exp_avg", "exp_avg_sq"):
            out[key][name] = safe_get_full_optimizer_state(p, key).detach().cpu().clone()
    steps = {float(s["step"]) for s in engine.optimizer.optimizer.state.values() if "step" in s}
    sched = engine.lr_scheduler.state_dict()
    out["counters"] = {"optimizer_step": sorted(steps), "lr_last_epoch": sched["last_epoch"],
                       "lr": engine.get_lr(), "global_steps": engine.global_steps, "trainer_step": trainer.step,
                       "nonfinite_total": trainer.nonfinite_total}
    out["ema"] = trainer.ema.full_state_dict()
    return out


def dump(trainer, when: str) -> None:
    state = engine_state(trainer)
    if trainer.rt.rank == 0:
        name = f"{when}_step{trainer.step}_world{trainer.rt.world_size}.pt"
        torch.save(state, os.path.join(os.environ["PROBE_DIR"], name))


def main(argv: list[str]) -> None:
    import logging

    from dig.train import trainer as trainer_module
    from dig.train.config import resolve, validate
    from dig.train.tracking import NullTracker
    from dig.train.trainer import Trainer

    if os.environ.get("PROBE_TRACKING") == "none":
        trainer_module.make_tracker = lambda *args, **kwargs: NullTracker()

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config, overrides = argv[argv.index("--config") + 1], argv[argv.index("--config") + 2:]
    resolved = resolve(config, overrides)
    trainer = Trainer(validate(resolved, source=config), resolved)
    if trainer.step > 0:
        dump(trainer, "resumed")
    save = trainer.save_checkpoint

    def save_then_dump(*args, **kwargs):
        save(*args, **kwargs)
        if trainer.step >= trainer.cfg.steps:
            dump(trainer, "final")

    trainer.save_checkpoint = save_then_dump
    trainer.fit()


if __name__ == "__main__":
    main(sys.argv[1:])
