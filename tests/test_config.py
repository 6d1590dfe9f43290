"""Training config: YAML + dotted overrides → typed objects; clear errors for what cannot run."""
from __future__ import annotations

import json
import os

import pytest

from dig.cli import main
from dig.data.shard_format import Manifest
from dig.train.config import ConfigError, load_config, resolve, validate
from dig.train.engine import Runtime, deepspeed_config, warmup_then_constant

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs", "train")
TINY = os.path.join(CONFIGS, "tiny-cpu.yaml")


@pytest.mark.parametrize("name", sorted(os.listdir(CONFIGS)))
def test_shipped_configs_validate(name):
    cfg = load_config(os.path.join(CONFIGS, name))
    assert cfg.data.global_batch_size % cfg.data.micro_batch_size == 0


def test_paper_recipe():
    cfg = load_config(os.path.join(CONFIGS, "dig-xl2-imagenet256.yaml"))
    assert (cfg.model.name, cfg.optim.lr, cfg.optim.weight_decay, cfg.data.global_batch_size, cfg.ema_decay,
            cfg.model.class_dropout_prob) == ("DiG-XL/2", 1e-4, 0.0, 256, 0.9999, 0.1)
    # the measured fastest engine for a model whose training state fits a GPU (BENCHMARKS.md, issue 11)
    assert (cfg.engine.zero_stage, cfg.engine.precision, cfg.model.compile, cfg.model.compile_mode) == (
        0, "amp", True, "reduce-overhead")
    ft = load_config(os.path.join(CONFIGS, "dig-xl2-imagenet1024-ft.yaml"))
    assert ft.data.resolution == 1024 and ft.model.pos_embed_base_size == 32 and ft.model.init_from


def test_dotted_overrides_are_typed():
    cfg = load_config(TINY, ["optim.lr=3e-4", "data.micro_batch_size=2", "engine.zero_stage=2",
                             "model.overrides.depth=4"])
    assert cfg.optim.lr == 3e-4 and cfg.data.micro_batch_size == 2 and cfg.engine.zero_stage == 2
    assert cfg.model_kwargs(8)["depth"] == 4 and cfg.model_kwargs(8)["input_size"] == 8


@pytest.mark.parametrize("override, message", [
    (["optim.lrr=1"], "optim.lrr: unknown key"),
    (["engine.zero_stage=5"], "engine.zero_stage"),
    (["model.name=DiG-XXL/2"], "unknown model 'DiG-XXL/2'"),
    (["model.overrides.depthh=3"], "model.overrides ['depthh'] are not options of DiG-S/2"),
    (["data.global_batch_size=10", "data.micro_batch_size=4"], "not a multiple of data.micro_batch_size=4"),
    (["steps=many"], "steps: Input should be a valid integer"),
    (["model.name=U-DiG-S/2", "model.scan_in_kernel=true"], "model.scan_in_kernel applies to DiG models"),
    (["model.compile=true", "model.compile_scope=stack", "engine.zero_stage=3"],
     "model.compile_scope=stack compiles all blocks as one region, but ZeRO-3"),
    (["model.compile_scope=graph"], "model.compile_scope"),
    (["model.compile=true", "model.compile_scope=stack", "model.grad_checkpointing=true", "engine.zero_stage=2"],
     "model.compile_scope=stack with model.grad_checkpointing"),
    (["engine.deepcompile=true", "model.compile=true", "engine.zero_stage=3"],
     "engine.deepcompile compiles the whole model itself under ZeRO stage 1, 2 or 3: set model.compile=false"),
    (["engine.deepcompile=true", "model.compile=false", "engine.zero_stage=0"],
     "engine.deepcompile compiles the whole model itself under ZeRO stage 1, 2 or 3"),
    (["engine.deepcompile=true", "engine.zero_stage=2", "engine.deepcompile_prefetch=false"],
     "engine.deepcompile_prefetch=false applies to engine.deepcompile=true with engine.zero_stage=3"),
])
def test_clear_errors(override, message):
    with pytest.raises(ConfigError) as exc:
        load_config(TINY, override)
    assert message in str(exc.value)


def test_missing_data_section_is_named():
    with pytest.raises(ConfigError, match="data: required key is missing"):
        validate(resolve(None, ["steps=3"]))


def test_batch_must_divide_by_world_times_micro_batch():
    cfg = load_config(TINY, ["data.global_batch_size=24", "data.micro_batch_size=4"])
    assert cfg.grad_accum_steps(3) == 2 and cfg.grad_accum_steps(6) == 1
    with pytest.raises(ConfigError, match="not divisible by world size 4 x data.micro_batch_size=4"):
        cfg.check_world(4)


def test_resolution_must_match_the_shards():
    cfg = load_config(TINY)
    manifest = Manifest(resolution=256, latent_channels=4, latent_size=32, vae="x", scaling_factor=0.18215,
                        dtype="float16", classes=["a"] * 10)
    with pytest.raises(ConfigError, match="data.resolution=64 but the shards .* hold 256px latents"):
        cfg.check_manifest(manifest)
    manifest.resolution, manifest.latent_size = 64, 8
    cfg.check_manifest(manifest)
    manifest.classes = ["a"] * 11
    with pytest.raises(ConfigError, match="model.num_classes=10 but the dataset has 11 classes"):
        cfg.check_manifest(manifest)


def test_deepspeed_config_from_the_run_config():
    import torch

    cfg = load_config(TINY, ["data.global_batch_size=16", "data.micro_batch_size=2", "optim.grad_clip=0.5",
                             "engine.zero_stage=1"])
    ds = deepspeed_config(cfg, Runtime(rank=0, local_rank=0, world_size=2, device=torch.device("cpu"), bf16=False))
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == \
        (16, 2, 4)
    assert ds["zero_optimization"]["stage"] == 1 and not any(k.startswith("stage3_")
                                                            for k in ds["zero_optimization"])
    assert ds["gradient_clipping"] == 0.5 and ds["optimizer"]["params"]["torch_adam"] is True
    assert ds["bf16"]["enabled"] is False


def test_warmup_then_constant():
    f = warmup_then_constant(4)
    assert [f(i) for i in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert warmup_then_constant(0)(0) == 1.0


def test_cli_reports_config_errors(capsys):
    assert main(["train", "--config", TINY, "optim.lrr=1"]) == 2
    assert "optim.lrr: unknown key" in capsys.readouterr().err


def test_params_carry_no_credentials():
    from dig.train.config import flatten
    from dig.train.tracking import redact

    cfg = load_config(TINY, ["tracking.uri=https://alice:s3cret@mlflow.example.org"])
    params = redact(flatten(cfg.model_dump()))
    assert params["tracking.uri"] == "https://<redacted>@mlflow.example.org"
    assert "s3cret" not in json.dumps(params, default=str)
    assert redact({"storage.aws_secret_access_key": "x", "data.path": "s3://b/p"}) == {
        "storage.aws_secret_access_key": "<redacted>", "data.path": "s3://b/p"}


def test_scan_in_kernel_reaches_the_model():
    from dig.models import create_model

    cfg = load_config(TINY, ["model.scan_in_kernel=true"])
    model = create_model(cfg.model.name, **cfg.model_kwargs(8))
    assert model.scan_in_kernel and model.scan_token_orders.shape == (4, 16)
    assert "scan_in_kernel" not in load_config(TINY, []).model_kwargs(8)
