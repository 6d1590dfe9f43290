"""`python -m data_pipeline --input URI --output URI --resolution 256 --vae ID_OR_PATH [--config YAML] ...`

What `ray job submit --working-dir . -- python -m data_pipeline ...` and `make preprocess` run."""
from __future__ import annotations

import argparse
import logging
import sys

import yaml

from dig.data.storage import StorageError

from .config import PipelineConfig, load_config
from .job import PipelineError, run


def parse_args(argv: list[str] | None = None) -> PipelineConfig:
    parser = argparse.ArgumentParser(prog="python -m data_pipeline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file of settings (configs/preprocess/*.yaml); flags override it")
    for name, field in PipelineConfig.model_fields.items():
        # Values stay strings here; pydantic converts and validates them with the YAML ones.
        parser.add_argument("--" + name.replace("_", "-"), dest=name, default=None,
                            help=f"{field.description or ''} (default: {field.default})"
                            if not field.is_required() else field.description)
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="settings as in the YAML (e.g. shard_size=500); flags win over these")
    args = vars(parser.parse_args(argv))
    settings = {}
    for item in args.pop("overrides"):
        key, sep, value = item.partition("=")
        if not sep or key.replace("-", "_") not in PipelineConfig.model_fields:
            parser.error(f"expected key=value with a known setting, got {item!r}")
        settings[key.replace("-", "_")] = yaml.safe_load(value)
    settings.update({k: v for k, v in args.items() if k != "config" and v is not None})
    return load_config(args["config"], settings)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        cfg = parse_args(argv)
        run(cfg)
    except (StorageError, PipelineError, ValueError) as exc:
        print(f"data_pipeline: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
