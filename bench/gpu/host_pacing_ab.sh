#!/usr/bin/env bash
# One H200 (device tool, kind nvidia-h200, carrying .whl), one call: the trainer's host settings through `dig
# train` (DiG-XL/2, 256 px, 32 images; main's defaults: garbage collection every 50 steps with automatic GC off,
# GIL hand-over every 0.5 ms), against Python's own settings and each setting alone, one run after the other;
# then DiT-XL/2 with the defaults for the DiG/DiT ratio. gpu_idle.sh's train part, without its idle part.
EXTRA="python-host:host.gc_every=0,host.gil_switch_interval_ms=5;gc-only:host.gil_switch_interval_ms=5"
EXTRA+=";switch-only:host.gc_every=0"
EXTRA=$EXTRA IDLE=0 SCRATCH=/tmp/pacing TRAIN_LIMIT=${TRAIN_LIMIT:-560} TRAIN_TAIL=12 exec bash bench/gpu/gpu_idle.sh
