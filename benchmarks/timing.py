"""What the step benchmarks share: the machine's matmul ceiling, our compiled train step on random
inputs, and its timing."""
import os
import resource
import time

import jax
import numpy as np

from scale_jax import model_info, modalities, sharding
from scale_jax.train import (build_train_setup, measure_peak_tflops, preloaded_mallocs,
                              transparent_huge_pages, xla_flops)


def matmul_ceiling_tflops(dtype) -> float:
  """TFLOP/s of the best of 5 2048^3 matmuls on one device: what XLA's matmul reaches."""
  return measure_peak_tflops(dtype, n=2048)


def compile_step(config, compiler_options=None, devices=None):
  """The compiled train step (with XLA `compiler_options`, e.g. {'xla_cpu_...': '...'}) on a mesh
  of `devices` (default: all), its state and batch, its FLOPs per step (see step_flops) and the
  compile time."""
  mesh = sharding.make_mesh(config.mesh, devices)
  setup = build_train_setup(config, mesh)  # the trainer's own step, built the trainer's way
  state = setup.init(jax.random.key(0))
  batch = modalities.random_batch(config, config.batch_size, np.random.default_rng(0))
  batch = jax.device_put(batch, setup.batch_shardings)
  t = time.perf_counter()
  compiled = setup.train_step.lower(state, batch).compile(compiler_options=compiler_options)
  compile_s = time.perf_counter() - t
  state, metrics = compiled(state, batch)  # warm-up
  jax.block_until_ready(metrics)
  return compiled, state, batch, step_flops(config, compiled, mesh.size), compile_s


def counts_by_formula(config) -> bool:
  """Whether step_flops gives the model formula's count (scale_jax/model_info.py) rather than
  XLA's: XLA counts a scanned layer stack once, not once per layer."""
  return bool(config.model.scan_layers)


def step_flops(config, compiled, num_devices) -> float:
  """XLA's count of the compiled step, or the model formula's (counts_by_formula)."""
  if counts_by_formula(config):
    return model_info.flops_per_example(config)['train'] * config.batch_size
  return xla_flops(compiled, num_devices)


def time_steps(compiled, state, batch, steps):
  """Seconds of each of `steps` steps (each waited for); the advanced state."""
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t)
  return times, state


def step_memory_gb(compiled) -> float:
  """What XLA allocates for one step: arguments, outputs and temporaries (donated arguments, which
  the outputs reuse, counted once)."""
  m = compiled.memory_analysis()
  return (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
          - m.alias_size_in_bytes) / 1e9


def xla_flags() -> str:
  """This process's XLA_FLAGS, for the report: they can change which kernels run (e.g. every dot
  through Eigen) and how many devices the cores are split into (docs/benchmarks.md)."""
  return os.environ.get('XLA_FLAGS', '').strip() or 'none'


def allocator() -> str:
  """The malloc this process runs on, for the report: XLA:CPU allocates every step's buffers
  afresh, and glibc's malloc hands large ones back to the kernel, which faults them in again each
  step, 4 KiB at a time, unless a preloaded caching allocator (tcmalloc) or glibc's own settings
  (GLIBC_TUNABLES, MALLOC_*) keep them, or fault them in as 2 MiB huge pages
  (glibc.malloc.hugetlb=1, where the kernel's mode allows; docs/benchmarks.md)."""
  preloaded = preloaded_mallocs()
  settings = [f'{k}={v}' for k, v in sorted(os.environ.items())
              if k == 'GLIBC_TUNABLES' or k.startswith('MALLOC_')]
  name = ', '.join(preloaded) if preloaded else ' '.join(['glibc malloc', *settings])
  return f'{name}; transparent huge pages: {transparent_huge_pages()}'


def peak_rss_gb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux
