#!/usr/bin/env bash
# Adds diffusers and everything it imports (resolved by pip for the GPU machine's Python 3.12, x86-64) to DIR
# (default .whl, after ../shared/gpu/prepare-wheels.sh), for bench/gpu/encoder_sweep.sh. Leaves out what the GPU
# machine already has (numpy, pyyaml, safetensors, tqdm: its KINDS.md), so the device's own builds are used.
#   bash bench/gpu/prepare-encoder-wheels.sh [DIR]        # ~20 MB
# huggingface_hub < 2: the GPU image's transformers (which diffusers imports when present) refuses hub 2.x.
set -euo pipefail
DIR=${1:-.whl}
mkdir -p "$DIR"
VERSION=$(.venv/bin/python -c "import importlib.metadata as m; print(m.version('diffusers'))")
TMP=$(mktemp -d); trap 'rm -rf "$TMP"' EXIT
python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d "$TMP" "diffusers==$VERSION" "huggingface_hub<2"
rm -f "$TMP"/numpy-*.whl "$TMP"/pyyaml-*.whl "$TMP"/safetensors-*.whl "$TMP"/tqdm-*.whl
mv "$TMP"/*.whl "$DIR"/
du -sh "$DIR"
