"""The command line shared by `python -m scale_jax.train` and `python -m scale_jax.evaluate`:
--config FILE (with --config.x=y overrides), --workdir DIR, and the multi-process flags.

Multi-process runs call jax.distributed.initialize before anything touches a device, with
  --distributed: JAX finds the coordinator itself (TPU pods, SLURM, Open MPI, Kubernetes);
  --coordinator_address, --num_processes, --process_id (or the environment variables
  JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID): anywhere else, e.g. localhost.
"""
import os
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags


def _env_int(name):
  return int(os.environ[name]) if os.environ.get(name) else None


def distributed_args(distributed: bool, coordinator_address, num_processes, process_id):
  """The arguments of jax.distributed.initialize, or None for a single-process run."""
  if not (distributed or coordinator_address or num_processes or process_id is not None):
    return None
  return dict(coordinator_address=coordinator_address, num_processes=num_processes,
              process_id=process_id)


def run(fn):
  """Parses the flags and calls fn(config, workdir)."""
  config_flags.DEFINE_config_file('config', None, 'config file (configs/*.py)', lock_config=True)
  flags.DEFINE_string('workdir', None, 'run directory: checkpoints, metrics, results')
  flags.mark_flags_as_required(['config', 'workdir'])
  flags.DEFINE_bool('distributed', False,
                    'call jax.distributed.initialize() first: on TPU pods and SLURM/Kubernetes '
                    'GPU clusters it finds the coordinator itself; elsewhere give the three below')
  flags.DEFINE_string('coordinator_address', os.environ.get('JAX_COORDINATOR_ADDRESS'),
                      'host:port of process 0 (default: $JAX_COORDINATOR_ADDRESS)')
  flags.DEFINE_integer('num_processes', _env_int('JAX_NUM_PROCESSES'),
                       'number of processes in the run (default: $JAX_NUM_PROCESSES)')
  flags.DEFINE_integer('process_id', _env_int('JAX_PROCESS_ID'),
                       'this process, 0 .. num_processes - 1 (default: $JAX_PROCESS_ID)')

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f'unexpected arguments: {argv[1:]}')
    if not flags.FLAGS['verbosity'].present:  # Orbax logs every checkpoint step at INFO
      logging.set_verbosity(logging.WARNING)
    f = flags.FLAGS
    args = distributed_args(f.distributed, f.coordinator_address, f.num_processes, f.process_id)
    if args is not None:
      # CPU processes need gloo for cross-process collectives; other platforms ignore this.
      jax.config.update('jax_cpu_collectives_implementation', 'gloo')
      jax.distributed.initialize(**args)
    try:
      fn(f.config, f.workdir)
    except FloatingPointError as e:  # a non-finite loss: the message says where, no traceback
      print(f'error: {e}', file=sys.stderr, flush=True)
      sys.exit(1)

  app.run(main)
