r"""Compiles the train step for a mesh of fake CPU devices and reports memory per device, without
running it or allocating the model: an out-of-memory check before a pod is booked.

    python -m scale_jax.aot --config configs/large.py --mesh data=2,fsdp=8,tensor=1 \
        [--batch-size N] [--config.x=y ...]

The step is the trainer's own (scale_jax.train.build_train_setup), lowered against abstract
inputs (shapes, dtypes and shardings) and compiled by XLA's CPU compiler for
data x fsdp x tensor devices. The figures are that compiler's: GPU and TPU compilers fuse,
lay out and rematerialise differently, so treat them as an estimate (parameter and optimizer
bytes are exact; temporaries are the CPU compiler's, often an over-estimate next to TPU's).
"""
import os
import sys

import numpy as np


def parse_mesh(text: str) -> dict:
  """'data=2,fsdp=8,tensor=1' -> {'data': 2, 'fsdp': 8, 'tensor': 1}; unnamed axes are 1."""
  sizes = {'data': 1, 'fsdp': 1, 'tensor': 1}
  for part in filter(None, text.split(',')):
    name, _, value = part.partition('=')
    if name.strip() not in sizes or int(value) < 1:
      raise ValueError(f'--mesh {text!r}: give positive sizes of data, fsdp and tensor, '
                       f'e.g. data=2,fsdp=8,tensor=1')
    sizes[name.strip()] = int(value)
  return sizes


def _fake_devices_from_argv(argv):
  """One fake CPU device per mesh position. Must run before jax is imported."""
  text = None
  for i, arg in enumerate(argv):
    if arg.startswith('--mesh='):
      text = arg.split('=', 1)[1]
    elif arg == '--mesh' and i + 1 < len(argv):
      text = argv[i + 1]
  if text is not None:
    count = int(np.prod(list(parse_mesh(text).values())))
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '')
                               + f' --xla_force_host_platform_device_count={count}')
    os.environ['JAX_PLATFORMS'] = 'cpu'


if __name__ == '__main__':
  _fake_devices_from_argv(sys.argv)

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
from absl import app, flags, logging
from ml_collections import config_flags

from scale_jax import sharding
from scale_jax.train import build_train_setup



def memory_report(config, mesh) -> dict:
  """Per-device bytes of the compiled train step of `config` on `mesh` (never run)."""
  setup = build_train_setup(config, mesh)
  compiled = setup.train_step.lower(setup.abstract_state, setup.abstract_batch).compile()
  m = compiled.memory_analysis()
  report = {
      'parameters': sharding.bytes_per_device(setup.abstract_state.params),
      'parameters + optimizer state': sharding.bytes_per_device(
          (setup.abstract_state.params, setup.abstract_state.opt_state)),
      'batch': sharding.bytes_per_device(setup.abstract_batch),
      'arguments': m.argument_size_in_bytes,
      'outputs': m.output_size_in_bytes,
      'aliased (donated arguments reused as outputs)': m.alias_size_in_bytes,
      'temporaries': m.temp_size_in_bytes,
      'generated code': m.generated_code_size_in_bytes,
  }
  # Donated buffers serve as outputs, so they count once.
  report['total'] = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
                     + m.temp_size_in_bytes + m.generated_code_size_in_bytes)
  return report


def format_report(report, config, mesh) -> str:
  sizes = ' '.join(f'{k}={v}' for k, v in mesh.shape.items())
  unit, scale = ('GiB', 2 ** 30) if report['total'] >= 2 ** 30 else ('MiB', 2 ** 20)
  lines = [f'train step, batch {config.batch_size} ({config.microbatches} microbatch(es)), mesh '
           f'{sizes} on {mesh.size} fake CPU devices; memory per device:']
  lines += [f'  {k:<48}{v / scale:12.3f} {unit}' for k, v in report.items()]
  lines.append('From the CPU compiler: GPU and TPU compilers lay memory out differently; treat '
               'temporaries and the total as an estimate.')
  return '\n'.join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.WARNING)
  f = flags.FLAGS
  config = f.config
  if f['batch-size'].value:
    config.batch_size = f['batch-size'].value
  config.mesh.update(parse_mesh(f.mesh))
  mesh = sharding.make_mesh(config.mesh)
  print(format_report(memory_report(config, mesh), config, mesh))


if __name__ == '__main__':
  config_flags.DEFINE_config_file('config', None, 'config file (configs/*.py)', lock_config=True)
  flags.DEFINE_string('mesh', None, 'mesh sizes, e.g. data=2,fsdp=8,tensor=1')
  flags.DEFINE_integer('batch-size', None, 'global batch size (default: the config\'s)')
  flags.mark_flags_as_required(['config', 'mesh'])
  app.run(main)
