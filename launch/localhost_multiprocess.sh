#!/usr/bin/env bash
# N processes on this machine, each with 2 fake CPU devices, joined by jax.distributed (gloo):
# the multi-host code path without a cluster.
#   launch/localhost_multiprocess.sh 2 configs/tiny.py RUN_DIR [--config.x=y ...]
set -euo pipefail
n=${1:?number of processes}; config=${2:?config file}; workdir=${3:?workdir}; shift 3
port=${PORT:-12355}
export XLA_FLAGS="--xla_force_host_platform_device_count=2"
pids=()
for ((i = 0; i < n; i++)); do
  "${PYTHON:-.venv/bin/python}" -m scale_jax.train --config "$config" --workdir "$workdir" \
      --coordinator_address "127.0.0.1:$port" --num_processes "$n" --process_id "$i" "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
