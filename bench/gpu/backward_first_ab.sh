#!/usr/bin/env bash
# One H200 (device tool, kind nvidia-h200, carrying .whl), one call: `dig train` DiG-XL/2 at 256 px / 32 images
# with the backward queued before the loss statistics are read back (engine.backward_before_loss_check, main's
# default) against the statistics checked first, one run after the other. gpu_idle.sh's train part.
EXTRA="loss-check-first:engine.backward_before_loss_check=false" MODELS=${MODELS:-DiG-XL/2} IDLE=0 \
  SCRATCH=/tmp/bwfirst TRAIN_LIMIT=${TRAIN_LIMIT:-300} TRAIN_TAIL=10 exec bash bench/gpu/gpu_idle.sh
