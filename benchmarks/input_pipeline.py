r"""Times the Grain input pipeline of a config alone (no train step): examples/s per worker count.

    python benchmarks/input_pipeline.py --data-dir DATA [--config configs/demo.py,configs/paper.py]
        [--workers 0,1,2] [--batches 30] [--warmup 3] [--batch-size B]
        [--step-rate 210,0.94 | --time-step] [--steps 3]

DATA is a dataset written by `python -m scale_jax.data.build` (for the synthetic catalogue:
`python -m scale_jax.data.synthetic --out D/raw --num-products 3000 --seed 0` then
`python -m scale_jax.data.build --raw D/raw --out D/data`); it replaces every config's
`data.dir`. Any config decodes any dataset at its own sizes (the paper config decodes the
synthetic 64 px / 8 frame / 2 s media at 192 px, 12 frames and 12 s), so the paper config needs no
M5Product to be measured. The pipeline is `pipeline.train_dataset(config)` exactly as training
builds it (shuffle, decode, masks, batch; `data.num_workers` Grain worker processes, 0 = in this
process with `data.read_threads` threads), for one process (process_count 1).

For each config and worker count: `--warmup` batches are drawn and discarded (worker start-up,
imports, first reads; at least one per worker), then `--batches` batches are timed in the first
epoch, where every product is read and decoded. Where the config caches decoded products
(`data.cache_mb`), the rest of the epoch is drawn and `--batches` more are timed from the cache
(what every later epoch runs at). Reported: examples/s of both, the CPU time per example of this
process and its workers together in the first epoch (what decoding costs, independent of how
many cores there are), and the start-up time (iterator creation to the first batch).

The train step's consumption rate (examples/s), for the ratio pipeline / step, is either given,
`--step-rate` (one per config, in --config order; e.g. from benchmarks/train_step.py), or measured
here with `--time-step` (benchmarks/train_step.py's benchmark, `--steps` steps; minutes for the
paper config on a CPU). The project's bar is a ratio of at least 5 (issue 3).

Timings share the machine with whatever else runs: the load average before and after is printed.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags

from scale_jax.data import pipeline
from scale_jax.model_info import load_config

try:
  import psutil
except ImportError:  # CPU times are then reported for this process only (workers uncounted)
  psutil = None

REQUIRED_RATIO = 5.0  # issue 3: the pipeline alone delivers >= 5x what the train step consumes


def _cpu_seconds():
  """CPU seconds (user + system) of this process and its live child processes (Grain workers)."""
  if psutil is None:
    t = os.times()
    return t.user + t.system
  me = psutil.Process()
  total = sum(me.cpu_times()[:2])
  for child in me.children(recursive=True):
    try:
      total += sum(child.cpu_times()[:2])
    except psutil.NoSuchProcess:
      pass
  return total


def _list(values, kind=str):
  """Flattens repeatable, comma-separated arguments."""
  return [kind(v) for arg in values for v in str(arg).split(',') if v.strip()]


def measure(config, workers, batches, warmup):
  """Examples/s of `batches` batches of pipeline.train_dataset after `warmup` discarded ones."""
  config.data.num_workers = workers
  t0 = time.perf_counter()
  it = iter(pipeline.train_dataset(config, process_index=0, process_count=1))
  batch = next(it)
  startup_s = time.perf_counter() - t0
  for _ in range(max(warmup, workers) - 1):  # every worker has delivered once before timing
    batch = next(it)
  batch_size = len(batch['label'])
  drawn = max(warmup, workers)

  def timed():
    cpu, t = _cpu_seconds(), time.perf_counter()
    for _ in range(batches):
      next(it)
    wall = time.perf_counter() - t
    cpu = _cpu_seconds() - cpu  # read before the workers go away
    examples = batches * batch_size
    return examples / wall, 1e3 * wall / examples, 1e3 * cpu / examples

  rate, ms, cpu_ms = timed()
  drawn += batches
  cached_rate = None
  if config.data.cache_mb:  # the decoded-product cache serves every epoch after the first
    epoch = len(pipeline.open_split(config.data.dir, 'train'))
    for _ in range(-(-epoch // batch_size) - drawn + 1):
      next(it)
    cached_rate = timed()[0]
  it.close()  # stops the worker processes and frees their shared memory
  return {'examples_per_s': rate, 'ms_per_example': ms, 'cpu_ms_per_example': cpu_ms,
          'cached_examples_per_s': cached_rate, 'startup_s': startup_s, 'batch_size': batch_size}


def time_train_step(config, steps):
  """Examples/s the train step of the config consumes (benchmarks/train_step.py, random batch)."""
  from benchmarks import train_step  # pylint: disable=g-import-not-at-top  (imports JAX)
  return train_step.benchmark(config, steps, peak_gflops=1.0)['examples_per_s']


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n', maxsplit=1)[0])
  parser.add_argument('--config', action='append', default=None,
                      help='config file(s); repeatable or comma-separated '
                           '(default: configs/demo.py,configs/paper.py)')
  parser.add_argument('--data-dir', required=True, help='a dataset built by scale_jax.data.build')
  parser.add_argument('--workers', default='0,1,2', help='Grain worker counts (comma-separated)')
  parser.add_argument('--batches', type=int, default=30, help='timed batches per measurement')
  parser.add_argument('--warmup', type=int, default=3, help='discarded batches first')
  parser.add_argument('--batch-size', type=int, default=None, help='override batch_size')
  parser.add_argument('--read-threads', type=int, default=None, help='override data.read_threads')
  parser.add_argument('--step-rate', action='append', default=None,
                      help='the train step\'s examples/s, one per config (comma-separated)')
  parser.add_argument('--time-step', action='store_true',
                      help='measure the train step\'s examples/s here (benchmarks/train_step.py)')
  parser.add_argument('--steps', type=int, default=3, help='timed train steps with --time-step')
  args = parser.parse_args()
  if not flags.FLAGS.is_parsed():  # Grain's workers read absl flags: take the defaults
    flags.FLAGS.mark_as_parsed()

  paths = _list(args.config or ['configs/demo.py,configs/paper.py'])
  workers = _list([args.workers], int)
  step_rates = _list(args.step_rate, float) if args.step_rate else [None] * len(paths)
  if len(step_rates) != len(paths):
    parser.error(f'--step-rate gives {len(step_rates)} rates for {len(paths)} configs')

  print(f'{os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.2f} at the start')
  rows = []
  for path, step_rate in zip(paths, step_rates):
    config = load_config(path)
    config.data.dir = args.data_dir
    if args.batch_size:
      config.batch_size = args.batch_size
    if args.read_threads:
      config.data.read_threads = args.read_threads
    for w in workers:
      r = measure(config, w, args.batches, args.warmup)
      rows.append([path, w, r, step_rate])
      print(f'  {path} workers {w}: {r["examples_per_s"]:.1f} examples/s', flush=True)
  print(f'load average {os.getloadavg()[0]:.2f} after the pipeline runs', flush=True)
  if args.time_step:  # last: JAX is imported (and its thread pools started) only now
    for path in paths:
      config = load_config(path)
      if args.batch_size:
        config.batch_size = args.batch_size
      rate = time_train_step(config, args.steps)
      print(f'  {path} train step: {rate:.1f} examples/s', flush=True)
      for row in rows:
        if row[0] == path:
          row[3] = rate
  print()

  header = (f'{"config":<14}{"batch":>6}{"workers":>8}{"threads":>8}{"ex/s 1st ep":>12}'
            f'{"ex/s cached":>12}{"CPU ms/ex":>10}{"start s":>8}{"step ex/s":>10}'
            f'{"x step":>8}{"cached":>8}')
  print(header)
  print('-' * len(header))

  def ratio(rate, step_rate):
    if not (rate and step_rate):
      return f'{"-":>8}'
    x = rate / step_rate
    return f'{x:>7.1f}{"*" if x < REQUIRED_RATIO else " "}'

  for path, w, r, step_rate in rows:
    threads = args.read_threads or load_config(path).data.read_threads
    cached = r['cached_examples_per_s']
    print(f'{os.path.basename(path):<14}{r["batch_size"]:>6}{w:>8}{threads:>8}'
          f'{r["examples_per_s"]:>12.1f}{f"{cached:.1f}" if cached else "-":>12}'
          f'{r["cpu_ms_per_example"]:>10.2f}{r["startup_s"]:>8.1f}'
          f'{f"{step_rate:.1f}" if step_rate else "-":>10}'
          f'{ratio(r["examples_per_s"], step_rate)}{ratio(cached, step_rate)}')
  if any(s for *_, s in rows):
    print(f'* below the required {REQUIRED_RATIO:g}x the train step\'s rate')


if __name__ == '__main__':
  main()
