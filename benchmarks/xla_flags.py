r"""Times benchmarks/train_step.py under several XLA_FLAGS settings, in alternating whole processes,
to choose them per machine by a measurement: XLA flags act on a whole process, so they cannot be
timed beside each other in one run the way train_step.py times its own variants.

    python benchmarks/xla_flags.py --variant '' \
        --variant '--xla_cpu_experimental_ynn_fusion_type=-individual_dot' [--rounds 2] \
        -- --config configs/clip_peer.py --steps 4 [any other train_step.py flags]

Each --variant is added to this process's own XLA_FLAGS (the first variant is the reference;
'' is the flags as they are). Words of a variant of the form NAME=VALUE with an upper-case NAME
are set in the run's environment instead, for the other whole-process settings, e.g. a caching
malloc: --variant 'LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4'. Every round
runs train_step.py once per variant, in turn, so that a change in the machine's load hits them
alike; each run measures its own matmul ceiling. The report: per round, each variant's step time
(train_step.py's `step_ms`, the median of its steps), its f32 ceiling, the process's peak
resident memory (an allocator that keeps memory may hold more) and the allocator and XLA_FLAGS
the run reports; then each variant's median over the rounds and its largest peak memory, its
speed-up over the first and in how many rounds it was faster, and the fastest here. The last
line is `speedup <first / second>`. Record results, with the machine, in docs/benchmarks.md.
"""
import os
import re
import statistics
import subprocess
import sys
from typing import NamedTuple

from absl import app, flags

flags.DEFINE_multi_string('variant', None, 'XLA flags added to XLA_FLAGS for one variant (the '
                          "first is the reference; '' for none)")
flags.DEFINE_integer('rounds', 2, 'rounds over the variants, each variant once per round')

TRAIN_STEP = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'train_step.py')


def split_variant(variant: str) -> tuple[dict, str]:
  """({environment variable: value}, XLA flags) of a variant."""
  env, xla = {}, []
  for word in variant.split():
    name, eq, value = word.partition('=')
    if eq and re.fullmatch(r'[A-Z][A-Z0-9_]*', name):
      env[name] = value
    else:
      xla.append(word)
  return env, ' '.join(xla)


def label(variant: str) -> str:
  env, xla = split_variant(variant)
  return ''.join(f'{k}={v}, ' for k, v in env.items()) + f'XLA_FLAGS + {xla!r}'


class Run(NamedTuple):
  """What one train_step.py process reports."""
  step_ms: float
  ceiling: float  # f32 GFLOP/s, the better of its before and after
  peak_gb: float  # the process's peak resident memory
  malloc: str
  xla_flags: str


def run_train_step(variant: str, args) -> Run:
  """train_step.py with `args` under the variant, and what it reports."""
  extra, xla = split_variant(variant)
  env = dict(os.environ, **extra, XLA_FLAGS=f'{os.environ.get("XLA_FLAGS", "")} {xla}'.strip())
  proc = subprocess.run([sys.executable, TRAIN_STEP, *args], env=env, capture_output=True,
                        text=True, check=False)
  step = re.search(r'^step_ms ([0-9.]+)\s*$', proc.stdout, re.MULTILINE)
  if proc.returncode or not step:
    sys.exit(f'train_step.py under XLA_FLAGS={env["XLA_FLAGS"]!r} ({label(variant)}) failed (exit '
             f'{proc.returncode}):\n{proc.stderr[-3000:]}')

  def reported(pattern):
    return re.search(pattern, proc.stdout, re.MULTILINE).group(1)

  ceiling = re.search(r'float32 (\d+) GFLOP/s before, (\d+) after', proc.stdout)
  return Run(step_ms=float(step.group(1)),
             ceiling=max(float(ceiling.group(1)), float(ceiling.group(2))),
             peak_gb=float(reported(r'^peak resident memory of this process: ([0-9.]+) GB')),
             malloc=reported(r'^allocator of this run: (.*)$'),
             xla_flags=reported(r'^XLA_FLAGS of this run: (.*)$'))


def main(argv):
  variants = flags.FLAGS.variant
  if len(variants or []) < 2:
    raise app.UsageError("give at least two --variant (e.g. --variant '' --variant '--xla_...')")
  args = argv[1:]  # what follows `--`: train_step.py's own flags
  runs = {v: [] for v in variants}
  for i in range(flags.FLAGS.rounds):
    for variant in variants:
      run = run_train_step(variant, args)
      runs[variant].append(run)
      print(f'round {i + 1}, {label(variant)}: step_ms {run.step_ms:.1f} (f32 ceiling '
            f'{run.ceiling:.0f} GFLOP/s; peak memory {run.peak_gb:.2f} GB; allocator '
            f'{run.malloc}; the run\'s XLA_FLAGS: {run.xla_flags})', flush=True)
  times = {v: [run.step_ms for run in r] for v, r in runs.items()}
  base = variants[0]
  median = {v: statistics.median(t) for v, t in times.items()}
  print(f'train_step.py {" ".join(args)}; XLA_FLAGS of this process: '
        f'{os.environ.get("XLA_FLAGS", "").strip() or "none"}')
  for variant in variants:
    faster = sum(t < b for t, b in zip(times[variant], times[base]))
    rounds = len(times[variant])
    line = (f'{label(variant)}: {median[variant]:.1f} ms/step (median of {rounds} rounds), '
            f'peak memory {max(run.peak_gb for run in runs[variant]):.2f} GB')
    if variant != base:
      line += f', {median[base] / median[variant]:.3f}x the first, faster in {faster} of {rounds}'
    print(line)
  print(f'fastest here: {label(min(median, key=median.get))}')
  print(f'speedup {median[base] / median[variants[1]]:.3f}')


if __name__ == '__main__':
  app.run(main)
