#!/usr/bin/env bash
# One host, all its devices (CPU, one or more GPUs, or a single TPU VM).
#   launch/local.sh configs/demo.py RUN_DIR [--config.x=y ...]
set -euo pipefail
config=${1:?config file}; workdir=${2:?workdir}; shift 2
exec "${PYTHON:-.venv/bin/python}" -m scale_jax.train --config "$config" --workdir "$workdir" "$@"
