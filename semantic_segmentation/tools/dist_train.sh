#!/usr/bin/env bash
# The seed's habit: bash tools/dist_train.sh CONFIG GPUS [train.py arguments...]
# Launched by mcbeit-torchrun (torchrun whose exit status says "preempted, run me again": 75), one process per GPU
# (per CPU slot without one). CONFIG may leave out .py, as the seed's README writes it.
set -e
CONFIG=$1
GPUS=$2
PORT=${PORT:-29500}
cd "$(dirname "$0")/.."
python -m mcbeit.launch --nproc_per_node="$GPUS" --master_port="$PORT" tools/train.py "$CONFIG" --launcher pytorch "${@:3}"
