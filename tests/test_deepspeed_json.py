"""The user's DeepSpeed JSON against the training config: conflicts are errors naming both values."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from dig.train.config import ConfigError, load_config
from dig.train.deepspeed_json import OWNED
from dig.train.engine import Runtime, deepspeed_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "train", "tiny-cpu.yaml")
CPU2 = Runtime(rank=0, local_rank=0, world_size=2, device=torch.device("cpu"), bf16=False)


def _config(tmp_path, user_json: dict, *overrides):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(user_json))
    return load_config(TINY, [f"engine.deepspeed_config={path}", "data.global_batch_size=16",
                              "data.micro_batch_size=2", "optim.grad_clip=0.5", "engine.zero_stage=2", *overrides])


@pytest.mark.parametrize("user, key, theirs, ours", [
    ({"train_batch_size": 64}, "train_batch_size", "64", "16"),
    ({"train_micro_batch_size_per_gpu": 8}, "train_micro_batch_size_per_gpu", "8", "2"),
    ({"gradient_accumulation_steps": 1}, "gradient_accumulation_steps", "1", "4"),
    ({"gradient_clipping": 1.0}, "gradient_clipping", "1.0", "0.5"),
    ({"zero_optimization": {"stage": 3}}, "zero_optimization.stage", "3", "2"),
    ({"bf16": {"enabled": True}}, "bf16.enabled", "true", "false"),
    ({"optimizer": {"type": "Adam", "params": {"lr": 0.001}}}, "optimizer.type", '"Adam"', '"AdamW"'),
    ({"optimizer": {"type": "AdamW", "params": {"lr": 0.001}}}, "optimizer.params.lr", "0.001", "0.0001"),
    ({"communication_data_type": "fp16"}, "communication_data_type", '"fp16"', "null"),
    ({"compile": {"deepcompile": True}}, "compile.deepcompile", "true", "false"),
])
def test_a_conflicting_value_is_an_error_naming_both(tmp_path, user, key, theirs, ours):
    cfg = _config(tmp_path, user, "optim.lr=1e-4")
    with pytest.raises(ConfigError) as err:
        deepspeed_config(cfg, CPU2)
    line = next(line for line in str(err.value).splitlines() if line.strip().startswith(key + ":"))
    assert f"JSON has {theirs}" in line and f"training config gives {ours}" in line


def test_every_conflict_is_listed_at_once(tmp_path):
    cfg = _config(tmp_path, {"train_batch_size": 64, "gradient_clipping": 0.0, "scheduler": {"type": "WarmupLR"}})
    with pytest.raises(ConfigError) as err:
        deepspeed_config(cfg, CPU2)
    text = str(err.value)
    for key, owner in (("train_batch_size", "data.global_batch_size"), ("gradient_clipping", "optim.grad_clip"),
                       ("scheduler", "optim.warmup_steps")):
        assert f"  {key}:" in text and owner in text


def test_equal_values_and_extra_keys_are_kept(tmp_path):
    user = {"train_batch_size": 16, "gradient_clipping": 0.5, "bf16": {"enabled": False, "immediate_grad_update": True},
            "optimizer": {"type": "AdamW", "params": {"amsgrad": True}},
            "zero_optimization": {"stage": 2, "reduce_bucket_size": 12345, "stage3_max_live_parameters": 7},
            "wall_clock_breakdown": True, "activation_checkpointing": {"partition_activations": True}}
    ds = deepspeed_config(_config(tmp_path, user), CPU2)
    assert ds["train_batch_size"] == 16 and ds["gradient_accumulation_steps"] == 4 and ds["gradient_clipping"] == 0.5
    assert ds["bf16"] == {"enabled": False, "immediate_grad_update": True}
    assert ds["optimizer"]["type"] == "AdamW" and ds["optimizer"]["params"]["amsgrad"] is True
    assert ds["optimizer"]["params"]["lr"] == pytest.approx(1e-3)  # tiny-cpu.yaml's optim.lr
    assert ds["zero_optimization"]["stage"] == 2 and ds["zero_optimization"]["reduce_bucket_size"] == 12345
    assert "stage3_max_live_parameters" not in ds["zero_optimization"]  # ignored by DeepSpeed below stage 3
    assert ds["wall_clock_breakdown"] is True  # cosmetic: the user's value wins
    assert ds["activation_checkpointing"] == {"partition_activations": True}


def test_grad_allreduce_dtype_sets_deepspeeds_communication_dtype(tmp_path):
    assert deepspeed_config(_config(tmp_path, {}), CPU2)["communication_data_type"] is None
    bf16 = deepspeed_config(_config(tmp_path, {"communication_data_type": "bf16"}, "engine.grad_allreduce_dtype=bf16"),
                            CPU2)
    assert bf16["communication_data_type"] == "bf16"


def test_deepcompile_turns_on_deepspeeds_compile_section_keeping_the_users_knobs(tmp_path):
    assert deepspeed_config(_config(tmp_path, {}), CPU2)["compile"] == {"deepcompile": False}
    on = deepspeed_config(_config(tmp_path, {"compile": {"free_activation": True}}, "engine.deepcompile=true",
                                  "engine.zero_stage=3"), CPU2)
    assert on["compile"] == {"free_activation": True, "deepcompile": True}


@pytest.mark.parametrize("given, parsed", [
    ("9.0a", "9.0"), ("8.0 8.6 9.0a", "8.0;8.6;9.0"), ("9.0;9.0a;10.0f+PTX", "9.0;10.0+PTX"), ("8.6+PTX", "8.6+PTX"),
])
def test_the_arch_list_deepcompile_builds_for_is_one_deepspeeds_builder_parses(given, parsed, monkeypatch):
    from deepspeed.ops.op_builder.builder import CUDAOpBuilder

    from dig.train.engine import deepspeed_arch_list

    class JitBuilder(CUDAOpBuilder):  # DeepSpeed's own parsing of TORCH_CUDA_ARCH_LIST, as DeepCompile's op uses it
        BUILD_VAR, NAME = "DS_BUILD_DIG_TEST", "dig_test"

        def __init__(self):
            super().__init__(name=self.NAME)
            self.jit_mode = True

        def absolute_name(self):
            return self.NAME

        def sources(self):
            return []

    assert deepspeed_arch_list(given) == parsed
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", parsed)
    JitBuilder().compute_capability_args()
    if given != parsed:  # what the builder does with the list as given
        monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", given)
        with pytest.raises(ValueError, match="invalid literal for int"):
            JitBuilder().compute_capability_args()


@pytest.mark.parametrize("user, named", [
    ({"compile": {"offload_opt_states": True}}, "compile.offload_opt_states"),
    ({"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}, "zero_optimization.offload_optimizer"),
])
def test_deepcompile_refuses_its_offloading_which_moves_the_weights_the_ema_reads(tmp_path, user, named):
    with pytest.raises(ConfigError, match=f"engine.deepcompile with DeepCompile's offloading \\({named} in"):
        deepspeed_config(_config(tmp_path, user, "engine.deepcompile=true", "engine.zero_stage=3"), CPU2)
    deepspeed_config(_config(tmp_path, user, "engine.zero_stage=3"), CPU2)  # without DeepCompile: passed through


def test_deepcompile_without_cuda_is_a_clear_error_before_deepspeed_starts(tmp_path, monkeypatch):
    import deepspeed.compile.util

    from dig.models import create_model
    from dig.train.engine import build_engine

    monkeypatch.setattr(deepspeed.compile.util, "is_deepcompile_supported", lambda: False)  # also on a GPU machine
    cfg = _config(tmp_path, {}, "engine.deepcompile=true", "engine.zero_stage=3")
    model = create_model(cfg.model.name, **cfg.model_kwargs(8))
    with pytest.raises(ConfigError, match="engine.deepcompile needs CUDA"):
        build_engine(model, cfg, CPU2)


def test_a_number_written_as_float_is_the_same_value(tmp_path):
    ds = deepspeed_config(_config(tmp_path, {"train_batch_size": 16.0, "gradient_clipping": 0.5}), CPU2)
    assert ds["train_batch_size"] == 16


def test_readme_lists_the_owned_keys():
    readme = open(os.path.join(REPO, "README.md")).read()
    missing = [key for key in OWNED if f"`{key}`" not in readme]
    assert not missing, f"README does not list the DeepSpeed keys the training config owns: {missing}"


_COUNT_SYNCS = r"""
import json, sys
import torch
from dig.models import create_model
from dig.train.config import load_config
from dig.train.engine import build_engine, init_distributed, shutdown

cfg = load_config(sys.argv[1], sys.argv[2:])
runtime = init_distributed(cfg)
from deepspeed.accelerator import get_accelerator

accelerator, syncs = get_accelerator(), []
real_sync = accelerator.synchronize
accelerator.synchronize = lambda *a, **k: (syncs.append(1), real_sync(*a, **k))[1]
torch.manual_seed(0)
engine = build_engine(create_model(cfg.model.name, input_size=8, num_classes=10, **cfg.model.overrides), cfg, runtime)
for _ in range(4):
    out = engine(torch.randn(4, 4, 8, 8), torch.rand(4), torch.randint(0, 10, (4,)))
    engine.backward(out.float().square().mean())
    engine.step()
print(json.dumps({"syncs": len(syncs)}))
shutdown()
"""


@pytest.mark.parametrize("zero_stage", [0, 3])
def test_deepspeed_does_not_synchronise_the_device_each_step(tmp_path, zero_stage):
    """DeepSpeed's throughput timer synchronises the device in every engine.forward and engine.step unless turned
    off; the trainer turns it off (a user's JSON may turn it back on). The CPU accelerator's synchronize is a
    no-op, but its calls are counted here the same."""
    script = tmp_path / "count_syncs.py"
    script.write_text(_COUNT_SYNCS)
    timers_on = tmp_path / "timers.json"
    timers_on.write_text(json.dumps({"timers": {"throughput": {"enabled": True, "synchronized": True}}}))
    env = {**os.environ, "PYTHONPATH": REPO, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "TORCH_EXTENSIONS_DIR": os.path.join(REPO, ".torch_extensions")}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    counts = {}
    for name, extra in (("trainer", []), ("user timers", [f"engine.deepspeed_config={timers_on}"])):
        done = subprocess.run([sys.executable, str(script), TINY, f"engine.zero_stage={zero_stage}",
                               "data.global_batch_size=4", *extra], env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        counts[name] = json.loads(done.stdout.strip().splitlines()[-1])["syncs"]
    assert counts["trainer"] == 0
    assert counts["user timers"] >= 4  # the counter sees DeepSpeed's synchronisations when the timer is on
