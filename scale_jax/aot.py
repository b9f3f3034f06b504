r"""Compiles the real train step for a pod without the pod, and reports what each device would
hold: an out-of-memory and cost check before a slice is booked. Nothing is run or allocated.

    python -m scale_jax.aot --config configs/pods/v5p_128.py          # the config's pod
    python -m scale_jax.aot --config C --topology v5e:16x16 [--slices 2] [--mesh data=..,fsdp=..]
    python -m scale_jax.aot --config C --mesh data=2,fsdp=8,tensor=1   # fake CPU devices

The step is the trainer's own (scale_jax.train.build_train_setup), lowered against abstract
inputs (shapes, dtypes and shardings).
- With a TPU topology (`--topology`, or the config's `pod.topology`), libtpu's compiler (the pip
  package of `jax[tpu]`, the `tpu` extra) compiles it for abstract TPU devices on this CPU
  machine: the memory figures and the cost model are the TPU compiler's own, as on the pod.
- Without one, XLA's CPU compiler compiles it for data x fsdp x tensor fake CPU devices:
  parameter and optimizer bytes are exact; temporaries are the CPU compiler's, often more than a
  TPU's.
Only a GPU can compile for a GPU: for a GPU cluster, run the trainer for a step on one node.
"""
import os
import re
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


def _flag_value(argv, name):
  for i, arg in enumerate(argv):
    if arg.startswith(f'--{name}='):
      return arg.split('=', 1)[1]
    if arg == f'--{name}' and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _fake_devices_from_argv(argv):
  """One fake CPU device per mesh position (not for a TPU topology). Must run before jax is
  imported."""
  text = _flag_value(argv, 'mesh')
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')  # TPU devices here are abstract, never attached
  if text is not None and _flag_value(argv, 'topology') is None:
    count = int(np.prod(list(parse_mesh(text).values())))
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '')
                               + f' --xla_force_host_platform_device_count={count}')


if __name__ == '__main__':
  _fake_devices_from_argv(sys.argv)

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
from absl import app, flags, logging
from ml_collections import config_flags

from scale_jax import config_check, model_info, sharding
from scale_jax.train import build_train_setup

# HBM per chip (GiB), by the device_kind libtpu reports; a chip with two TensorCores shown as two
# devices gives each half.
CHIP_HBM_GIB = {'TPU v4': 32, 'TPU v5 lite': 16, 'TPU v5': 95, 'TPU v6 lite': 32}
# Datasheet bf16 peak per chip (TFLOP/s): the bound under which no step runs.
CHIP_BF16_TFLOPS = {'TPU v4': 275, 'TPU v5 lite': 197, 'TPU v5': 459, 'TPU v6 lite': 918}
COLLECTIVES = ('all-gather', 'all-reduce', 'reduce-scatter', 'all-to-all', 'collective-permute')


def compile_step(config, mesh):
  """(the train setup, the compiled train step of `config` on `mesh`), never run."""
  setup = build_train_setup(config, mesh)
  return setup, setup.train_step.lower(setup.abstract_state, setup.abstract_batch).compile()


def memory_report(config, mesh, compiled=None, setup=None) -> dict:
  """Per-device bytes of the compiled train step of `config` on `mesh` (never run); compiled
  here unless given with its setup."""
  if compiled is None:
    setup, compiled = compile_step(config, mesh)
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


def collective_counts(compiled) -> dict:
  """How many of each collective the compiled (per-device) program holds."""
  hlo = compiled.as_text()
  return {op: len(re.findall(rf'= [^\n=]*? {op}(?:-start)?\(', hlo)) for op in COLLECTIVES}


def cost_report(compiled) -> dict:
  """The compiler's cost analysis of one step on one device: FLOPs, bytes accessed and (TPU)
  the cost model's step time, in seconds, when it gives one."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  out = {'flops': float(cost.get('flops', 0.0)), 'bytes accessed': float(
      cost.get('bytes accessed', 0.0))}
  seconds = float(cost.get('optimal_seconds', -1.0))
  if seconds > 0:
    out['estimated step seconds'] = seconds
  return out


def _devices_per_chip(mesh) -> int:
  """2 where each TensorCore of a chip is its own device, else 1: they share the chip's HBM and
  FLOPs."""
  return len({getattr(d, 'core_on_chip', 0) for d in mesh.devices.flat})


def step_time_bound(config, mesh) -> dict | None:
  """The model's training FLOPs per device and step (model_info's formula: XLA's count covers
  one iteration of a scanned layer stack) and the step time they take at the chip's datasheet
  bf16 peak: a lower bound, not an estimate of the achieved time. None off TPU."""
  tflops = CHIP_BF16_TFLOPS.get(mesh.devices.flat[0].device_kind)
  if tflops is None:
    return None
  cores = _devices_per_chip(mesh)
  per_device = model_info.flops_per_example(config)['train'] * config.batch_size / mesh.size
  return {'model TFLOP per device': per_device / 1e12,
          'seconds at peak': per_device / (tflops * 1e12 / cores)}


def device_capacity(mesh) -> int | None:
  """HBM bytes of one device of the mesh, None when unknown (CPU, an unlisted chip)."""
  device = mesh.devices.flat[0]
  gib = CHIP_HBM_GIB.get(device.device_kind)
  if gib is None:
    return None
  cores = _devices_per_chip(mesh)
  return gib * 2 ** 30 // cores


def tpu_devices(topology: str, slices: int = 1):
  """Abstract TPU devices of a topology such as 'v5e:16x16' or 'v5p:4x4x4' (libtpu's compiler;
  no TPU needed)."""
  kind = topology.split(':')[0].lower()
  if not kind.startswith('v'):
    raise app.UsageError(
        f'--topology {topology}: only TPU topologies (v4:2x2x4, v5p:4x4x4, v5e:16x16, ...) '
        f'compile here. XLA compiles for a GPU only with that GPU attached: on a GPU cluster, '
        f'run the trainer for one step on a node (it reports the compiled step), or this tool '
        f'with --mesh there.')
  try:
    from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
    # Abstract devices touch no chip, so several processes may compile at once (libtpu
    # otherwise takes a machine-wide lock, meant for real TPUs).
    os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
    options = {'num_slices': slices} if slices > 1 else {}
    if kind == 'v4':  # JAX runs a v4 chip's two TensorCores as one device ("megacore")
      options['chip_config_name'] = 'megacore'
    desc = topologies.get_topology_desc(topology, 'tpu', **options)
  except Exception as e:  # pylint: disable=broad-except  (libtpu missing or a bad name)
    raise app.UsageError(
        f'--topology {topology}: libtpu could not describe it ({str(e).splitlines()[0][:200]}). '
        f'Install the tpu extra (pip install -e ".[tpu]") and give a name such as v5e:16x16 '
        f'or v5p:4x4x4.') from None
  return desc.devices


def format_report(report, config, mesh, cost=None, collectives=None, capacity=None,
                  bound=None) -> str:
  sizes = ' '.join(f'{k}={v}' for k, v in mesh.shape.items())
  device = mesh.devices.flat[0]
  where = (f'{mesh.size} fake CPU devices' if device.platform == 'cpu' else
           f'{mesh.size} abstract {device.device_kind} devices')
  unit, scale = ('GiB', 2 ** 30) if report['total'] >= 2 ** 30 else ('MiB', 2 ** 20)
  lines = [f'train step, batch {config.batch_size} ({config.microbatches} microbatch(es)), mesh '
           f'{sizes} on {where}; memory per device:']
  lines += [f'  {k:<48}{v / scale:12.3f} {unit}' for k, v in report.items()]
  if capacity:
    verdict = 'fits' if report['total'] <= capacity else 'DOES NOT FIT'
    label = "the device's HBM"
    lines.append(f'  {label:<48}{capacity / scale:12.3f} {unit}  '
                 f'{100 * report["total"] / capacity:.0f}% used: {verdict}')
  if device.platform == 'cpu':
    lines.append('From the CPU compiler: GPU and TPU compilers lay memory out differently; treat '
                 'temporaries and the total as an estimate.')
  else:
    lines.append('From the TPU compiler (libtpu), for abstract devices: nothing ran.')
  if cost:
    lines.append(f'compiler\'s cost per device and step: {cost["flops"] / 1e12:.3f} TFLOP, '
                 f'{cost["bytes accessed"] / 2 ** 30:.2f} GiB accessed (a scanned layer stack '
                 f'counted once)' + (
                     f'; the TPU cost model estimates {cost["estimated step seconds"]:.3f} s per '
                     f'step (an estimate, not a measurement)'
                     if 'estimated step seconds' in cost else ''))
  if bound:
    lines.append(f'model FLOPs per device and step (formula): {bound["model TFLOP per device"]:.1f} '
                 f'TFLOP; at the chip\'s bf16 datasheet peak that is {bound["seconds at peak"]:.3f} '
                 f's, a lower bound on the step time (at 40% MFU: '
                 f'{bound["seconds at peak"] / 0.4:.3f} s)')
  if collectives:
    lines.append('collectives in the step: ' + ', '.join(
        f'{n} {op}' for op, n in collectives.items()))
  return '\n'.join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.WARNING)
  f = flags.FLAGS
  config = f.config
  if f['batch-size'].value:
    config.batch_size = f['batch-size'].value
  if f.mesh:
    config.mesh.update(parse_mesh(f.mesh))
  pod = config.get('pod', {})
  topology = f.topology or pod.get('topology', '')
  if topology:
    devices = tpu_devices(topology, f.slices or pod.get('slices', 1))
    mesh = sharding.make_mesh(config.mesh, devices)
  elif f.mesh:
    mesh = sharding.make_mesh(config.mesh)
  else:
    raise app.UsageError('give --topology (a TPU slice, e.g. v5e:16x16), a config with '
                         'pod.topology, or --mesh (fake CPU devices)')
  try:
    setup, compiled = compile_step(config, mesh)
  except config_check.ConfigError as e:
    sys.exit(f'error: {e}')
  print(format_report(memory_report(config, mesh, compiled, setup), config, mesh,
                      cost_report(compiled),
                      collective_counts(compiled), device_capacity(mesh),
                      step_time_bound(config, mesh)))


if __name__ == '__main__':
  config_flags.DEFINE_config_file('config', None, 'config file (configs/*.py)', lock_config=True)
  flags.DEFINE_string('mesh', None, 'mesh sizes, e.g. data=2,fsdp=8,tensor=1')
  flags.DEFINE_string('topology', None, 'TPU topology, e.g. v5e:16x16, v5p:4x4x4, v4:2x2x4')
  flags.DEFINE_integer('slices', None, 'number of such slices (multislice over DCN)')
  flags.DEFINE_integer('batch-size', None, 'global batch size (default: the config\'s)')
  flags.mark_flags_as_required(['config'])
  app.run(main)
