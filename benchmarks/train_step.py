r"""Times the jitted SCALE train step of a config on this machine's devices, without input, against
the machine's own matmul ceiling measured in the same run.

    python benchmarks/train_step.py --config configs/clip_peer.py [--config.x=y ...] [--steps 10]
        [--matmul float32,bf16_operands --rounds 3] [--xla_option KEY=VALUE ...]
        [--compare 'text.max_masked=0 table.max_masked=0' ...]
        [--peak_tflops_per_device T] [--devices 1,2]

Reports per variant the median seconds per step, examples/s, the step's memory (XLA's buffer
assignment; and the process's peak resident memory), the step's FLOPs as XLA counts them
in the compiled program (forward + backward + optimizer, attention included), and the achieved
fraction (MFU) of the ceiling (for a scanned layer stack, which XLA counts once, the model
formula's FLOPs): the best of 5 runs of a 2048^3 float32 matmul (and bf16 with f32
accumulation, for a variant whose matmuls run in bf16) on one device, measured here before the
steps and again after them, so the figure is this machine's at this hour, never a constant;
with --peak_tflops_per_device (or the config's peak_tflops_per_device) also against that
datasheet figure. Several comma-separated --matmul values (model.matmul) are compiled once each
and timed in turn, --rounds times, so that a change in the machine's load hits them alike;
with --xla_option each is also compiled with those XLA compiler options (e.g.
xla_cpu_enable_fast_math=true; a list-valued option such as
xla_cpu_experimental_ynn_fusion_type=-individual_dot goes through XLA_FLAGS, for the whole run:
benchmarks/xla_flags.py times such settings against each other) and timed beside it; each
--compare adds a variant of the config with those overrides (space-separated). --devices 1,2
compiles every variant on a mesh of the first device, and again of the first two, and times
them beside each other: on a CPU, start it with
XLA_FLAGS=--xla_force_host_platform_device_count=2 to split the cores into two devices, i.e.
data parallelism across them (the devices share the cores, so the ceiling is the one machine's,
and the buffers are per device). With several variants it names the fastest here: choose
model.matmul, and the device count, per machine that way. The last line is
`step_ms <median of the first variant>`. Record results, with the machine, in docs/benchmarks.md.
"""
import ast
import dataclasses
import os
import statistics
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
from absl import app, flags
from ml_collections import config_flags

from benchmarks import timing
from scale_jax import cli, run_config
from scale_jax.train import matmul_dtype, peak_of_devices

config_flags.DEFINE_config_file('config', 'configs/demo.py', 'config file (configs/*.py)',
                                lock_config=True)
flags.DEFINE_integer('steps', 10, 'timed steps per variant and round')
flags.DEFINE_string('matmul', None, 'model.matmul values, comma-separated, timed in turn')
flags.DEFINE_integer('rounds', 1, 'timing rounds over the variants (interleaved)')
flags.DEFINE_multi_string('xla_option', [], 'KEY=VALUE XLA compiler options: each variant is '
                          'also timed compiled with them')
flags.DEFINE_multi_string('compare', [], 'space-separated config overrides KEY=VALUE: one more '
                          'variant each, timed beside the others')
flags.DEFINE_float('peak_tflops_per_device', 0.0, 'a datasheet peak to report MFU against too')
flags.DEFINE_string('devices', None, 'device counts, comma-separated: every variant is compiled '
                    'on a mesh of the first N devices, once per count (default: all devices)')


def xla_options(items):
  """--xla_option KEY=VALUE items as compiler options; a malformed item is a usage error."""
  options = {}
  for item in items:
    key, sep, value = item.partition('=')
    if not key or not sep:
      raise app.UsageError(f'--xla_option {item!r}: expected KEY=VALUE, e.g. '
                           f'xla_cpu_enable_fast_math=true')
    options[key] = value
  return options


def compared_config(config, overrides: str):
  """config with a --compare's space-separated KEY=VALUE overrides (VALUE a Python literal)."""
  values = {}
  for item in overrides.split():
    key, sep, value = item.partition('=')
    if not key or not sep:
      raise app.UsageError(f'--compare {overrides!r}: {item!r} is not KEY=VALUE')
    try:
      values[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError) as e:
      raise app.UsageError(f'--compare {overrides!r}: {value!r} is not a Python literal; quote '
                           f"a string, e.g. model.matmul='bf16_operands'") from e
  try:
    return run_config.with_overrides(config, values)
  except (KeyError, TypeError) as e:
    raise app.UsageError(f'--compare {overrides!r}: {e}') from e


@dataclasses.dataclass
class Run:
  """One variant on its devices: what compile_step gave, and the seconds of its timed steps."""
  config: Any
  devices: list
  compiled: Any
  state: Any
  batch: Any
  flops: float
  compile_s: float
  times: list = dataclasses.field(default_factory=list)


def main(argv):
  del argv
  f = flags.FLAGS
  config = f.config
  counts = [int(n) for n in f.devices.split(',')] if f.devices else [jax.device_count()]
  if max(counts) > jax.device_count():
    raise app.UsageError(
        f'--devices {f.devices}: this process has {jax.device_count()} device(s). On a CPU, '
        f'start it with XLA_FLAGS=--xla_force_host_platform_device_count={max(counts)}')
  matmuls = f.matmul.split(',') if f.matmul else [config.model.get('matmul', 'float32')]
  datasheet = f.peak_tflops_per_device or config.peak_tflops_per_device
  options = xla_options(f.xla_option)
  variants = []  # (label, config, XLA options)
  for matmul in matmuls:
    c = config.copy_and_resolve_references()
    c.model.matmul = matmul
    variants.append((matmul, c, None))
    if options:
      variants.append((f'{matmul} + {" ".join(f.xla_option)}', c, options))
  for overrides in f.compare:
    c = compared_config(config, overrides)
    variants.append((f'{c.model.matmul}, {overrides}', c, None))
  runs = {}
  for n in counts:
    for label, c, compiler_options in variants:
      if len(counts) > 1:
        label += f' [{n} device{"s" if n > 1 else ""}]'
      devices = jax.devices()[:n]
      try:
        runs[label] = Run(c, devices, *timing.compile_step(c, compiler_options, devices))
      except jax.errors.JaxRuntimeError as e:
        if not compiler_options or 'option' not in str(e):
          raise
        raise app.UsageError(
            f'--xla_option {" ".join(f.xla_option)}: XLA rejected it ({e}). A list-valued '
            f'option such as xla_cpu_experimental_ynn_fusion_type=-individual_dot is given '
            f'through XLA_FLAGS=--KEY=VALUE instead, for the whole run (benchmarks/'
            f'xla_flags.py times XLA_FLAGS settings against each other)') from e
  # The ceiling just before the steps (and again after them), not before the compiles.
  dtypes = {'float32'} | {matmul_dtype(c) for _, c, _ in variants}
  ceiling = {d: timing.matmul_ceiling_tflops(d) for d in sorted(dtypes)}
  for i in range(f.rounds):
    for label, run in runs.items():
      times, run.state = timing.time_steps(run.compiled, run.state, run.batch, f.steps)
      run.times += times
      print(f'round {i + 1}, matmul {label}: median {statistics.median(times):.3f} s/step '
            f'(min {min(times):.3f})', flush=True)
  # Again after the steps: the machine may have changed meanwhile.
  after = {d: timing.matmul_ceiling_tflops(d) for d in ceiling}
  print(f'ceiling (2048^3 matmul, best of 5, one device): ' + ', '.join(
      f'{d} {1e3 * ceiling[d]:.0f} GFLOP/s before, {1e3 * after[d]:.0f} after' for d in ceiling))
  for label, run in runs.items():
    c, devices, flops = run.config, run.devices, run.flops
    seconds = statistics.median(run.times)
    gflops = flops / 1e9 / seconds
    dtype = matmul_dtype(c)
    peak = 1e3 * peak_of_devices(max(ceiling[dtype], after[dtype]), devices)
    source = ' (model formula)' if timing.counts_by_formula(c) else ''
    line = (f'{config_flags.get_config_filename(f["config"])} batch {c.batch_size} matmul '
            f'{label} on {len(devices)} x {devices[0].device_kind}: {seconds:.3f} s/step '
            f'(median of {len(run.times)}), {c.batch_size / seconds:.1f} examples/s, '
            f'{flops / 1e9:.1f} GFLOP/step{source}, '
            f'{gflops:.1f} GFLOP/s = {100 * gflops / peak:.1f}% of '
            f'the measured {dtype} matmul ceiling ({peak:.0f} GFLOP/s)')
    if datasheet:
      line += (f', {100 * gflops / (1e3 * len(devices) * datasheet):.1f}% of {datasheet:g} '
               f'TFLOP/s/device')
    print(line + f'; {timing.step_memory_gb(run.compiled):.2f} GB of buffers'
          f'{" per device" if len(devices) > 1 else ""} (XLA: arguments, outputs, temporaries); '
          f'compile {run.compile_s:.1f} s', flush=True)
  print(f'peak resident memory of this process: {timing.peak_rss_gb():.2f} GB (all variants)')
  print(f'allocator of this run: {timing.allocator()}')
  print(f'XLA_FLAGS of this run: {timing.xla_flags()}')
  if len(runs) > 1:  # what to set on this machine (docs/benchmarks.md: it differs by CPU)
    fastest = min(runs, key=lambda label: statistics.median(runs[label].times))
    print(f'fastest here: {fastest}')
  first = next(iter(runs.values()))
  print(f'step_ms {1e3 * statistics.median(first.times):.1f}')


if __name__ == '__main__':
  # A failed config check in one line, not a traceback; a misspelt override named.
  app.run(cli.user_errors_in_one_line(main), flags_parser=cli.parse_flags)
