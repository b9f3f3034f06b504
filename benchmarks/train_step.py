r"""Times the jitted SCALE train step of a config on this machine's devices, without input.

    python benchmarks/train_step.py --config configs/demo.py [--batch-size B] [--dtype float32]
        [--steps 10] [--peak-gflops 430] [--matmul float32,bf16_operands --rounds 3]

Reports seconds per step, examples/s, the step's FLOPs as XLA counts them in the compiled
program (forward + backward + optimizer, attention included) and the achieved fraction of the
peak (MFU). The default peak is this project's CPU machine: f32 matmul on 2 cores, ~430 GFLOP/s.
Several comma-separated --matmul values (model.matmul) are compiled once each and then timed in
turn, --rounds times, so that a change in the machine's load hits them alike; each round prints.
Record results, with the machine, in docs/benchmarks.md.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import numpy as np

from scale_jax import modalities, sharding
from scale_jax.model_info import load_config
from scale_jax.train import build_train_setup, xla_flops


def compile_step(config):
  """The compiled train step, its state and batch, and XLA's FLOP count."""
  mesh = sharding.make_mesh(config.mesh)
  setup = build_train_setup(config, mesh)  # the trainer's own step, built the trainer's way
  state = setup.init(jax.random.key(0))
  batch = modalities.random_batch(config, config.batch_size, np.random.default_rng(0))
  batch = jax.device_put(batch, setup.batch_shardings)
  t = time.perf_counter()
  compiled = setup.train_step.lower(state, batch).compile()
  compile_s = time.perf_counter() - t
  state, metrics = compiled(state, batch)  # warm-up
  jax.block_until_ready(metrics)
  return compiled, state, batch, xla_flops(compiled, mesh.size), compile_s


def time_steps(compiled, state, batch, steps):
  """Mean seconds per step over `steps` steps; the advanced state."""
  t = time.perf_counter()
  for _ in range(steps):
    state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  return (time.perf_counter() - t) / steps, state


def benchmark(config, steps, peak_gflops):
  compiled, state, batch, flops, compile_s = compile_step(config)
  seconds, _ = time_steps(compiled, state, batch, steps)
  return report(config, seconds, flops, compile_s, peak_gflops)


def report(config, seconds, flops, compile_s, peak_gflops):
  return {'compile_s': compile_s, 'step_s': seconds,
          'examples_per_s': config.batch_size / seconds, 'gflop_per_step': flops / 1e9,
          'gflops': flops / 1e9 / seconds, 'mfu': flops / 1e9 / seconds / peak_gflops}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', default='configs/demo.py')
  parser.add_argument('--steps', type=int, default=10)
  parser.add_argument('--batch-size', type=int, default=None)
  parser.add_argument('--dtype', default=None, help='override model.dtype (CPU: float32)')
  parser.add_argument('--peak-gflops', type=float, default=430.0,
                      help='peak of the devices together (default: the 2-core CPU machine, f32)')
  parser.add_argument('--matmul', default=None,
                      help='override model.matmul; comma-separated values are timed in turn')
  parser.add_argument('--rounds', type=int, default=1,
                      help='timing rounds over the --matmul values (interleaved)')
  args = parser.parse_args()
  config = load_config(args.config)
  if args.batch_size:
    config.batch_size = args.batch_size
  if args.dtype:
    config.model.dtype = args.dtype
  variants = args.matmul.split(',') if args.matmul else [config.model.get('matmul', 'float32')]
  runs = {}
  for matmul in variants:
    c = config.copy_and_resolve_references()
    c.model.matmul = matmul
    runs[matmul] = [c, *compile_step(c)]
  for i in range(args.rounds):
    for matmul, run in runs.items():
      c, compiled, state, batch, flops, compile_s = run
      seconds, run[2] = time_steps(compiled, state, batch, args.steps)
      r = report(c, seconds, flops, compile_s, args.peak_gflops)
      print(f'{args.config} batch {c.batch_size} matmul {matmul} (round {i + 1}) on '
            f'{jax.device_count()} x {jax.devices()[0].device_kind}: {r["step_s"]:.3f} s/step, '
            f'{r["examples_per_s"]:.1f} examples/s, {r["gflop_per_step"]:.1f} GFLOP/step, '
            f'{r["gflops"]:.1f} GFLOP/s, MFU {100 * r["mfu"]:.1f}% of {args.peak_gflops:g} '
            f'GFLOP/s (compile {r["compile_s"]:.1f} s)', flush=True)


if __name__ == '__main__':
  main()
