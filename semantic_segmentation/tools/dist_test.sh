#!/usr/bin/env bash
# The seed's habit: bash tools/dist_test.sh CONFIG CHECKPOINT GPUS [test.py arguments, e.g. --eval mIoU]
set -e
CONFIG=$1
CHECKPOINT=$2
GPUS=$3
PORT=${PORT:-29500}
cd "$(dirname "$0")/.."
python -m mcbeit.launch --nproc_per_node="$GPUS" --master_port="$PORT" tools/test.py "$CONFIG" "$CHECKPOINT" --launcher pytorch "${@:4}"
