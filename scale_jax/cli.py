"""The command line shared by `python -m scale_jax.train` and `python -m scale_jax.evaluate`:
--config FILE (with --config.x=y overrides), --workdir DIR, and the multi-process flags. Without
--config, the run's own RUN/config.json is read (scale_jax/run_config.py), overrides included.

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

from scale_jax import config_check, run_config


def _env_int(name):
  return int(os.environ[name]) if os.environ.get(name) else None


def distributed_args(distributed: bool, coordinator_address, num_processes, process_id):
  """The arguments of jax.distributed.initialize, or None for a single-process run."""
  if not (distributed or coordinator_address or num_processes or process_id is not None):
    return None
  return dict(coordinator_address=coordinator_address, num_processes=num_processes,
              process_id=process_id)


def _flag_value(argv, name):
  for i, arg in enumerate(argv):
    if arg.startswith(f'--{name}='):
      return arg.split('=', 1)[1]
    if arg == f'--{name}' and i + 1 < len(argv):
      return argv[i + 1]
  return None


_PACKAGE = os.path.dirname(os.path.abspath(__file__))


def raised_for_the_user(error: BaseException) -> bool:
  """Whether the error was raised by a check of this package's own (a `raise ValueError(...)`
  naming the field or file and what to do), not by a library or numpy deep in a stack: those
  keep their traceback, which is what finding a bug needs."""
  if not isinstance(error, (ValueError, OSError)):
    return False
  frame = error.__traceback__
  if frame is None:
    return False
  while frame.tb_next is not None:
    frame = frame.tb_next
  return os.path.abspath(frame.tb_frame.f_code.co_filename).startswith(_PACKAGE + os.sep)


def user_errors_in_one_line(fn):
  """fn, made to print an error raised for the user (a failed config check, a bad file named with
  what to do) as one line and exit 1; every other error keeps its traceback."""
  def wrapped(*args):
    try:
      return fn(*args)
    except Exception as e:  # pylint: disable=broad-except
      if not (isinstance(e, (FloatingPointError, config_check.ConfigError))
              or raised_for_the_user(e)):
        raise
      print(f'error: {e}', file=sys.stderr, flush=True)  # the message says it all
      sys.exit(1)
  return wrapped


def with_saved_config(argv):
  """argv, plus `--config=<run_config.py>:RUN` when it names no --config and RUN/config.json
  exists, so that the run's own config is loaded (and --config.x=y overrides apply to it)."""
  if _flag_value(argv, 'config') is not None:
    return argv
  workdir = _flag_value(argv, 'workdir')
  if workdir and run_config.path(workdir).exists():
    return argv[:1] + [f'--config={run_config.__file__}:{workdir}'] + argv[1:]
  return argv


def parse_flags(argv):
  """absl's flag parsing, with an override of a field the config does not have (a typo in
  `--config.model.widht=1`) as one error line naming it; ml_collections raises a bare
  AttributeError or KeyError for it from deep in the parser."""
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as e:
    # Its text: the quoted key, and on a second line "Did you mean ..." when one is close.
    lines = str(e).replace('\\n', '\n').splitlines() or ['']
    key = lines[0].replace('\\', '').strip('"\' ')
    named = [a.split('=', 1)[0] for a in argv if a.startswith('--config.')
             and key in a.split('=', 1)[0][len('--config.'):].split('.')]
    if not named:
      raise
    hint = ''.join(' ' + line.strip().rstrip("'") for line in lines[1:2]
                   if line.startswith('Did you mean'))
    print(f'error: {named[0]}: the config has no field {named[0][len("--config."):]!r}.{hint} '
          f'(an override can only set a field the config file defines; --helpfull lists them)',
          file=sys.stderr, flush=True)
    sys.exit(1)


def run(fn):
  """Parses the flags and calls fn(config, workdir)."""
  config_flags.DEFINE_config_file('config', None, 'config file (configs/*.py); default: the '
                                  'run\'s own WORKDIR/config.json', lock_config=True)
  flags.DEFINE_string('workdir', None, 'run directory: checkpoints, metrics, results')
  flags.mark_flags_as_required(['workdir'])
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
    if f.config is None:
      raise app.UsageError(f'give --config FILE: {run_config.path(f.workdir)} does not exist '
                           f'(it is written when a run starts)')
    args = distributed_args(f.distributed, f.coordinator_address, f.num_processes, f.process_id)
    if args is not None:
      # CPU processes need gloo for cross-process collectives; other platforms ignore this.
      jax.config.update('jax_cpu_collectives_implementation', 'gloo')
      jax.distributed.initialize(**args)
    user_errors_in_one_line(fn)(f.config, f.workdir)

  app.run(main, argv=with_saved_config(sys.argv), flags_parser=parse_flags)
