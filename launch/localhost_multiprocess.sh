#!/usr/bin/env bash
# N processes on this machine, each with DEVICES (default 2) fake CPU devices, joined by
# jax.distributed (gloo): the multi-host code path without a cluster. Process 0 writes
# metrics.jsonl and the console.
#   launch/localhost_multiprocess.sh 2 configs/tiny.py RUN_DIR [--config.x=y ...]
# PORT (default 12355) is the coordinator's port; PYTHON the interpreter (default .venv/bin/python).
# A run may resume on another N (DEVICES=4 ... 1 resumes a run of 2 x 2 on one process).
set -euo pipefail
n=${1:?number of processes}; config=${2:?config file}; workdir=${3:?workdir}; shift 3
port=${PORT:-12355}
# Appended: XLA reads flags in order, so this device count wins over one already given.
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${DEVICES:-2}"
export JAX_PLATFORMS=cpu
pids=()
# A SIGTERM to this script reaches every process (each saves at the same step and exits 0).
trap 'kill -TERM "${pids[@]}" 2>/dev/null' TERM INT
for ((i = 0; i < n; i++)); do
  "${PYTHON:-.venv/bin/python}" -m scale_jax.train --config "$config" --workdir "$workdir" \
      --coordinator_address "127.0.0.1:$port" --num_processes "$n" --process_id "$i" "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
  while true; do  # `wait` returns early when a trapped signal arrives: wait again
    wait "$pid" && rc=0 || rc=$?
    kill -0 "$pid" 2>/dev/null || break
  done
  [ "$rc" -ne 0 ] && status=$rc
done
exit $status
