"""The evaluation keys of the training config and the shipped recipes."""
from __future__ import annotations

import os

import pytest

from dig.train.config import ConfigError, load_config

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "train")


def test_recipes_evaluate_on_imagenet_only_and_do_not_clip():
    tiny = load_config(os.path.join(CONFIGS, "tiny-cpu.yaml"))
    assert tiny.tracking.eval_every == 0
    for name, precision in (("dig-xl2-imagenet256.yaml", "amp"), ("dig-xl2-imagenet256-fp32.yaml", "fp32")):
        cfg = load_config(os.path.join(CONFIGS, name))
        assert cfg.optim.grad_clip == 0.0 and cfg.engine.precision == precision  # the release does not clip
        assert cfg.tracking.eval_every > 0 and cfg.tracking.eval.ref.endswith("VIRTUAL_imagenet256_labeled.npz")
        e = cfg.tracking.eval
        assert (e.num_steps, e.method, e.cfg_scale) == (250, "ddpm", 1.0)  # the release's FID sampler
    from dig.train.config import flatten

    recipe = flatten(load_config(os.path.join(CONFIGS, "dig-xl2-imagenet256.yaml")).model_dump())
    fp32 = flatten(load_config(os.path.join(CONFIGS, "dig-xl2-imagenet256-fp32.yaml")).model_dump())
    assert {k for k in recipe if recipe[k] != fp32[k]} == {"run.name", "run.dir", "engine.precision"}


def test_eval_needs_a_reference_and_enough_samples():
    tiny = os.path.join(CONFIGS, "tiny-cpu.yaml")
    with pytest.raises(ConfigError, match="tracking.eval_every > 0 needs tracking.eval.ref"):
        load_config(tiny, ["tracking.eval_every=10"])
    with pytest.raises(ConfigError, match="num_samples >= 4"):
        load_config(tiny, ["tracking.eval_every=10", "tracking.eval.ref=x.npz", "tracking.eval.num_samples=3"])
    cfg = load_config(tiny, ["tracking.eval_every=10", "tracking.eval.ref=x.npz", "tracking.eval.method=ddim"])
    assert cfg.tracking.eval.method == "ddim" and cfg.tracking.eval.num_samples == 5000


def test_missing_eval_files_fail_before_any_evaluation(tmp_path):
    from dig.eval.during_training import TrainingEvaluator

    cfg = load_config(os.path.join(CONFIGS, "tiny-cpu.yaml"),
                      ["tracking.eval_every=10", f"tracking.eval.ref={tmp_path / 'absent.npz'}"]).tracking.eval
    with pytest.raises(ConfigError, match="no such reference batch"):
        TrainingEvaluator(cfg, "DiG-S/2", {}, [4, 8, 8], None, "config:tiny", "cpu")
    (tmp_path / "ref.npz").write_bytes(b"")
    cfg = cfg.model_copy(update={"ref": str(tmp_path / "ref.npz"), "inception": str(tmp_path / "absent.pth")})
    with pytest.raises(ConfigError, match="absent.pth"):
        TrainingEvaluator(cfg, "DiG-S/2", {}, [4, 8, 8], None, "config:tiny", "cpu")
