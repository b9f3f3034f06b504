"""The command line shared by `python -m scale_jax.train` and `python -m scale_jax.evaluate`:
--config FILE (with --config.x=y overrides) and --workdir DIR."""
from absl import app, flags, logging
from ml_collections import config_flags


def run(fn):
  """Parses the flags and calls fn(config, workdir)."""
  config_flags.DEFINE_config_file('config', None, 'config file (configs/*.py)', lock_config=True)
  flags.DEFINE_string('workdir', None, 'run directory: checkpoints, metrics, results')
  flags.mark_flags_as_required(['config', 'workdir'])

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f'unexpected arguments: {argv[1:]}')
    if not flags.FLAGS['verbosity'].present:  # Orbax logs every checkpoint step at INFO
      logging.set_verbosity(logging.WARNING)
    fn(flags.FLAGS.config, flags.FLAGS.workdir)

  app.run(main)
