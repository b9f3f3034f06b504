"""The command line shared by `python -m scale_jax.train` and `python -m scale_jax.evaluate`:
--config FILE (with --config.x=y overrides), --workdir DIR, and the multi-host flags."""
import jax
from absl import app, flags, logging
from ml_collections import config_flags


def run(fn):
  """Parses the flags and calls fn(config, workdir)."""
  config_flags.DEFINE_config_file('config', None, 'config file (configs/*.py)', lock_config=True)
  flags.DEFINE_string('workdir', None, 'run directory: checkpoints, metrics, results')
  flags.mark_flags_as_required(['config', 'workdir'])
  flags.DEFINE_bool('distributed', False,
                    'call jax.distributed.initialize() first: on TPU pods and SLURM/Kubernetes '
                    'GPU clusters it finds the coordinator itself; elsewhere give the three below')
  flags.DEFINE_string('coordinator_address', None, 'host:port of process 0')
  flags.DEFINE_integer('num_processes', None, 'number of processes in the run')
  flags.DEFINE_integer('process_id', None, 'this process, 0 .. num_processes - 1')

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f'unexpected arguments: {argv[1:]}')
    if not flags.FLAGS['verbosity'].present:  # Orbax logs every checkpoint step at INFO
      logging.set_verbosity(logging.WARNING)
    f = flags.FLAGS
    if f.distributed or f.coordinator_address:
      jax.config.update('jax_cpu_collectives_implementation', 'gloo')  # only CPU runs use it
      jax.distributed.initialize(f.coordinator_address, f.num_processes, f.process_id)
    fn(f.config, f.workdir)

  app.run(main)
