"""README's configuration tables are the schemas' keys (generated), so they cannot drift."""
from __future__ import annotations

import os

from data_pipeline.config import PipelineConfig
from dig.cli import main
from dig.config_reference import BEGIN, END, reference, rows
from dig.train.config import TrainConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _leaf_keys(model, prefix=""):
    """Every dotted key of a pydantic schema, walked independently of the generator."""
    keys = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and hasattr(ann, "model_fields"):
            keys += _leaf_keys(ann, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def test_readme_holds_the_generated_reference():
    readme = open(os.path.join(REPO, "README.md")).read()
    section = readme.split(BEGIN, 1)[1].split(END, 1)[0].strip()
    assert section == reference().strip(), "README is out of date: run `python -m dig.config_reference README.md`"


def test_every_key_is_listed_with_its_default_and_a_meaning():
    for model in (TrainConfig, PipelineConfig):
        listed = rows(model)
        assert [r[0] for r in listed] == _leaf_keys(model)
        assert all(meaning for *_, meaning in listed), [key for key, *_, meaning in listed if not meaning]
    by_key = {r[0]: r for r in rows(TrainConfig)}
    assert by_key["optim.betas"][2] == "`[0.9, 0.999]`" and by_key["data.path"][2] == "**required**"
    assert by_key["engine.precision"][1] == '"auto" \\| "bf16" \\| "amp" \\| "fp32"'
    assert by_key["steps"][1:3] == ("int", "`1000`")


def test_dig_config_lists_keys_and_prints_the_effective_config(capsys):
    assert main(["config", "--list"]) == 0
    assert capsys.readouterr().out.strip() == reference().strip()
    tiny = os.path.join(REPO, "configs", "train", "tiny-cpu.yaml")
    assert main(["config", "--config", tiny, "optim.lr=0.5"]) == 0
    import yaml

    effective = yaml.safe_load(capsys.readouterr().out)
    assert effective["optim"]["lr"] == 0.5 and effective["optim"]["weight_decay"] == 0.0  # a default filled in
    assert main(["config", "--config", tiny, "optim.lrr=1"]) == 2
    assert "optim.lrr: unknown key" in capsys.readouterr().err
