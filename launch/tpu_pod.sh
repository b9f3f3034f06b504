#!/usr/bin/env bash
# Every worker of a Cloud TPU VM pod slice runs the same command; jax.distributed finds the
# coordinator itself. The repository and its .venv must already be on every worker
# (e.g. `gcloud compute tpus tpu-vm ssh $TPU --worker=all --command "git clone ... && make install"`),
# and the dataset and workdir on storage every worker reads (a shared disk or GCS via gcsfuse).
#   TPU=my-pod ZONE=us-central2-b launch/tpu_pod.sh configs/demo.py /mnt/runs/r1 --config.x=y
set -euo pipefail
config=${1:?config file}; workdir=${2:?workdir}; shift 2
gcloud compute tpus tpu-vm ssh "${TPU:?TPU name}" --zone "${ZONE:?zone}" --worker=all --command \
  "cd ${REPO_DIR:-scale_jax} && .venv/bin/python -m scale_jax.train --distributed \
   --config $config --workdir $workdir $*"
