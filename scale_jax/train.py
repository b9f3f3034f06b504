r"""Pretrains SCALE. `train` reads top to bottom: setup, mesh, model and train step (the config
checked first), evaluators, where the run starts, input (from the run's step), compilation, loop;
the functions above it are its parts, and the model, optimizer and checkpoints are
scale_jax/state.py's.

    python -m scale_jax.train --config configs/demo.py --workdir RUN [--config.x=y ...]

Where a run starts, in order of precedence:
  1. resume: RUN/checkpoints holds a checkpoint; the latest one is restored (parameters, optimizer
     state, step, RNG; the input position follows from the step), on this run's mesh and number
     of processes, whatever saved it (the batch size must be the same);
  2. init_from: config.init_from.workdir names another run; the parameters whose path the regex
     config.init_from.include finds are copied from its latest checkpoint, the rest (and the
     optimizer state) start fresh;
  3. scratch: a fresh initialisation from config.seed.
A SIGTERM (the preemption notice) saves at the current step and returns, so the process exits 0.
A non-finite loss or gradient stops the run with FloatingPointError naming the step and the
metric; the state is never updated with it and never saved. Writes RUN/metrics.jsonl, TensorBoard
events under RUN/tensorboard, and a progress bar on the console. docs/training.md has the details.
"""
import functools
import math
import os
import pathlib
import shutil
import signal
import tempfile
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import tensorboardX
import tqdm
from etils import epath
from jax.experimental import multihost_utils

from scale_jax import (cli, config_check, evaluators, losses, modalities, model_info, run_config,
                       sharding, state as run_state)
from scale_jax.data import build, pipeline
from scale_jax.evaluators import features

# ------------------------------------------------------------------------------------------------
# The objective's gradient and the train step (model, optimizer, state and checkpoints:
# scale_jax/state.py).

def microbatched(x, k: int):
  """[B, ...] -> [k, B/k, ...], microbatch j holding rows j, j + k, j + 2k, ...: each device's
  block of rows splits evenly over the microbatches, so every microbatch spans every device and
  nothing moves between devices."""
  return jnp.swapaxes(x.reshape((x.shape[0] // k, k) + x.shape[1:]), 0, 1)


def unmicrobatched(x):
  """The inverse of microbatched: [k, B/k, ...] -> [B, ...] in the batch's row order."""
  return jnp.swapaxes(x, 0, 1).reshape((-1,) + x.shape[2:])


# Model outputs that are parameters (or constants), the same for every microbatch.
PARAMETER_OUTPUTS = ('temperature', 'log_variances')


def metrics_and_grads(model, params, batch, config, rng, mesh, param_shardings=None):
  """Every objective term and the batch-mean weights over the global batch, and the gradient of
  the total loss; with config.microbatches = k > 1, computed k microbatches at a time (the
  gradient sum then kept sharded as `param_shardings`)."""
  apply = lambda p, b, r: model.apply({'params': p}, b, rngs={'dropout': r})
  k = config.microbatches
  if k == 1:
    def loss_fn(p):
      out = apply(p, batch, rng)
      loss, terms = losses.scale_objective(out, batch, config)
      return loss, {**terms, **losses.weight_means(out, batch['present'], config)}
    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return metrics, grads

  # GradCache (Gao et al. 2021): the contrastive terms couple every pair of products in the batch,
  # so a microbatch's own loss is not its share of the batch's. Instead:
  # 1. forward every microbatch, no gradients, for what couples products: the embeddings z (and
  #    the fused vectors, for the weight metrics);
  # 2. the contrastive objective over the whole batch from those, and its gradient with respect to
  #    z and to the outputs that are parameters (temperature, learned weight logits);
  # 3. each microbatch again, with gradients, of  <cotangent, z>  plus its per-product masked
  #    objectives divided by the whole batch's counts. Summed over microbatches this is exactly
  #    the whole batch's gradient. Cost: one extra forward pass; activation memory: a microbatch's.
  # Each microbatch draws the same randomness in 1 and 3 (fold_in(rng, j)).
  layout = lambda x: jax.lax.with_sharding_constraint(x, sharding.logical_sharding(
      mesh, (None, 'batch') + (None,) * (x.ndim - 2)))
  micro = jax.tree.map(lambda x: layout(microbatched(x, k)), batch)
  index = jnp.arange(k)

  def embed(_, xs):
    b, j = xs
    out = apply(params, b, jax.random.fold_in(rng, j))
    return None, (out['z'], out['fused'], {n: out[n] for n in PARAMETER_OUTPUTS if n in out})

  _, (z, fused, shared) = jax.lax.scan(embed, None, (micro, index))
  z, fused = unmicrobatched(z), unmicrobatched(fused)
  shared = jax.tree.map(lambda x: x[0], shared)

  def contrastive(z, shared):
    return losses.scale_objective({'z': z, 'fused': fused, 'predictions': {}, **shared}, batch,
                                  config)

  (_, metrics), (z_cot, shared_cot) = jax.value_and_grad(
      contrastive, argnums=(0, 1), has_aux=True)(z, shared)
  counts = losses.masked_product_counts(batch, config)

  def accumulate(grads, xs):
    b, z_cot, j = xs

    def surrogate(p):
      out = apply(p, b, jax.random.fold_in(rng, j))
      _, terms = losses.scale_objective(out, b, config, masked_counts=counts)
      masked = {n: terms[n] for n in (modalities.get(m).objective for m in out['predictions'])}
      value = jnp.vdot(z_cot, out['z']) + sum(config.loss[n] * v for n, v in masked.items())
      # Parameters read directly take their cotangent once, not once per microbatch.
      value += jnp.where(j == 0, sum(jnp.vdot(c, out[n]) for n, c in shared_cot.items()), 0.0)
      return value, masked

    (_, masked), g = jax.value_and_grad(surrogate, has_aux=True)(params)
    return jax.tree.map(jnp.add, grads, g), masked

  zeros = jax.tree.map(jnp.zeros_like, params)
  if param_shardings is not None:  # under FSDP the sum is as sharded as the parameters
    zeros = jax.lax.with_sharding_constraint(zeros, param_shardings)
  grads, masked = jax.lax.scan(accumulate, zeros, (micro, layout(microbatched(z_cot, k)), index))
  masked = {n: jnp.sum(v) for n, v in masked.items()}
  metrics.update(masked)
  metrics['loss'] = metrics['loss'] + sum(config.loss[n] * v for n, v in masked.items())
  metrics.update(losses.weight_means({'z': z, 'fused': fused, **shared}, batch['present'],
                                     config))
  return metrics, grads


def nonfinite_order(metrics) -> list:
  """The metrics checked for NaN/Inf, most specific first, so that the one a message names is
  where the trouble shows first (a modality's objective before the total loss)."""
  last = ('contrastive', 'loss', 'grad_norm')
  return sorted(k for k in metrics if k not in last) + [k for k in last if k in metrics]


def make_train_step(model, tx, schedule, config, state_shardings, batch_shardings):
  """The jitted step (state, batch) -> (state, metrics); the old state's buffers are donated."""
  mesh = jax.tree.leaves(batch_shardings)[0].mesh

  @functools.partial(jax.jit, in_shardings=(state_shardings, batch_shardings),
                     out_shardings=(state_shardings, None), donate_argnums=0)
  def train_step(state, batch):
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    metrics, grads = metrics_and_grads(model, state.params, batch, config, rng, mesh,
                                       state_shardings.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    metrics.update(grad_norm=optax.tree.norm(grads), lr=schedule(state.step))
    # A non-finite metric leaves the state as it was and records the first such step, which the
    # host reads at log steps and before every save (no host sync here).
    finite = jnp.stack([jnp.all(jnp.isfinite(metrics[k])) for k in nonfinite_order(metrics)])
    ok = jnp.all(finite)
    updated = state.replace(step=state.step + 1, opt_state=opt_state,
                            params=optax.apply_updates(state.params, updates))
    new = jax.tree.map(lambda a, b: jnp.where(ok, a, b), updated, state)
    first = ~ok & (state.nonfinite_step < 0)
    return new.replace(
        nonfinite_step=jnp.where(first, state.step + 1, state.nonfinite_step),
        nonfinite_metric=jnp.where(first, jnp.argmin(finite), state.nonfinite_metric)), metrics

  return train_step


class TrainSetup(NamedTuple):
  """Everything a run compiles, built the same way by the trainer and by scale_jax.aot."""
  model: Any
  tx: optax.GradientTransformation
  schedule: Any
  init: Any  # jitted: PRNG key -> sharded TrainState
  state_shardings: Any
  batch_shardings: Any
  train_step: Any  # jitted, not yet compiled
  abstract_state: Any  # ShapeDtypeStructs with this mesh's shardings
  abstract_batch: Any


def build_train_setup(config, mesh) -> TrainSetup:
  config_check.check(config, mesh)  # before anything is traced: every problem, named
  model = run_state.build_model(config, mesh)
  tx, schedule = run_state.make_optimizer(config)
  init, state_shardings = run_state.sharded_state_init(model, tx, config, mesh)
  batch_shardings = sharding.batch_sharding(mesh, modalities.dummy_batch(config, 1))
  step = make_train_step(model, tx, schedule, config, state_shardings, batch_shardings)
  abstract_state = run_state.abstract_like(jax.eval_shape(init, jax.random.key(0)),
                                           state_shardings)
  abstract_batch = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct((config.batch_size,) + x.shape[1:], x.dtype, sharding=s),
      modalities.dummy_batch(config, 1), batch_shardings)
  return TrainSetup(model, tx, schedule, init, state_shardings, batch_shardings, step,
                    abstract_state, abstract_batch)


# ------------------------------------------------------------------------------------------------
# FLOPs.

def xla_flops(compiled, num_devices: int) -> float:
  """FLOPs of one call of a compiled computation on all devices, as XLA counts them.

  XLA counts the partitioned (per-device) program; work replicated across devices, such as the
  update of replicated parameters, is counted once per device.
  """
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get('flops', 0.0)) * num_devices


def measure_peak_tflops(dtype, n=None, repeats=5) -> float:
  """TFLOP/s of the best of `repeats` n^3 matmuls on one device (n: 1024 on a CPU, 8192 on an
  accelerator, by default): an achievable peak, below the datasheet's. The products accumulate
  in f32, as the model's bf16 matmuls do: XLA:CPU runs a bf16 matmul with bf16 output on a slower
  kernel (166 against 269 GFLOP/s on an AVX512_BF16 EPYC, 2048^3)."""
  device = jax.local_devices()[0]
  n = n or (1024 if device.platform == 'cpu' else 8192)
  a = jax.device_put(jnp.ones((n, n), dtype), device)
  matmul = jax.jit(lambda a: jnp.matmul(a, a, preferred_element_type=jnp.float32))
  matmul(a).block_until_ready()
  best = float('inf')
  for _ in range(repeats):
    t = time.perf_counter()
    matmul(a).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2 * n ** 3 / best / 1e12


def matmul_dtype(config) -> str:
  """The dtype the model's matmuls run in, whose peak MFU is against: bf16 for bf16 operands
  (model.matmul), the compute dtype otherwise."""
  if config.model.matmul == 'bf16_operands':
    return 'bfloat16'
  return str(jnp.dtype(config.model.dtype))


def peak_of_devices(one_device_tflops, devices) -> float:
  """The matmul peak of `devices`, from one device's measured peak. The CPU devices of a process
  share its cores, and one of them alone already multiplies on all of them: their peak is one
  measurement per process, however many devices its cores are split into."""
  if devices[0].platform == 'cpu':
    return one_device_tflops * len({d.process_index for d in devices})
  return one_device_tflops * len(devices)


# The kernel's transparent-huge-page mode: with `madvise` only memory that asks for huge pages
# gets them (glibc's malloc asks under GLIBC_TUNABLES=glibc.malloc.hugetlb=1); with `always` all
# of it does.
TRANSPARENT_HUGEPAGE = '/sys/kernel/mm/transparent_hugepage/enabled'


def transparent_huge_pages() -> str:
  """The kernel's transparent-huge-page mode (always, madvise, never), or 'unknown'."""
  try:
    with open(TRANSPARENT_HUGEPAGE) as f:
      modes = f.read().split()
  except OSError:
    return 'unknown'
  chosen = [m[1:-1] for m in modes if m.startswith('[') and m.endswith(']')]
  return chosen[0] if chosen else 'unknown'


def preloaded_mallocs() -> list[str]:
  """The file names of the malloc libraries in LD_PRELOAD (e.g. libtcmalloc_minimal.so.4)."""
  return [os.path.basename(p) for p in os.environ.get('LD_PRELOAD', '').replace(':', ' ').split()
          if 'malloc' in os.path.basename(p)]


def cpu_allocator_tip() -> str | None:
  """What to set where a CPU step's buffers are faulted in 4 KiB at a time, every step: XLA:CPU
  allocates them afresh and glibc's malloc gives them back. None where a malloc is preloaded,
  glibc's malloc is already tuned, or the kernel gives huge pages unasked (or never)."""
  if preloaded_mallocs() or 'glibc.malloc.' in os.environ.get('GLIBC_TUNABLES', '') or (
      transparent_huge_pages() != 'madvise'):
    return None
  return ('tip: on a CPU, GLIBC_TUNABLES=glibc.malloc.hugetlb=1 lets glibc fault each step\'s '
          'buffers in as 2 MiB pages, with nothing to install: the steps ran 1.1x to 1.5x faster '
          'on an AMD Zen 5 (docs/training.md, "On a CPU: the allocator", says how to time it)')


def check_finite(state, metrics, manager):
  """Raises FloatingPointError naming the first step and metric that were not finite. Reads two
  scalars from the device: called at log steps and before every save, not every step."""
  step, metric = (int(x) for x in jax.device_get((state.nonfinite_step, state.nonfinite_metric)))
  if step >= 0:
    latest = manager.latest_step()
    raise FloatingPointError(
        f'{nonfinite_order(metrics)[metric]} is not finite at step {step}: stopping. The state '
        f'was not updated with that step and is not saved; the last checkpoint '
        f'({"none" if latest is None else f"step {latest}"} in {manager.directory}) is intact.')


class PreemptionNotice:
  """SIGTERM (what TPU, Kubernetes and SLURM send before taking machines back) sets a flag; the
  loop then saves at the current step and stops. Every process must save at the same step, so in
  a multi-process run the flags are OR-ed across processes (a small allgather, which waits for
  the device queue) every `check_every` steps; a lone process looks at its flag every step."""

  def __init__(self, check_every: int):
    self.check_every, self.flag, self.previous = max(int(check_every), 1), False, None
    try:
      self.previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread (e.g. a notebook's worker): no handler
      pass

  def _handle(self, signum, frame):
    del signum, frame
    self.flag = True

  def requested(self, step: int) -> bool:
    if jax.process_count() == 1:
      return self.flag
    if step % self.check_every:
      return False
    return bool(np.any(multihost_utils.process_allgather(np.int32(self.flag))))

  def close(self):
    if self.previous is not None:
      signal.signal(signal.SIGTERM, self.previous)


class MetricsWriter:
  """metrics.jsonl (one object per logged step) and TensorBoard events from process 0; the
  profiler traces of every process under `tensorboard_dir`.

  A gs:// workdir gets them through a local staging directory (object stores cannot append): the
  files are written there and each changed one is uploaded whole by `sync`, at most every
  `sync_every_s` seconds on log steps, and always after a checkpoint, a trace and on close.
  """

  def __init__(self, workdir: str, sync_every_s: float = 60.0):
    self.active = jax.process_index() == 0
    self.remote = '://' in workdir
    self.workdir, self.sync_every_s, self.uploaded = workdir, sync_every_s, {}
    # Never synced: the first row goes up at once. (Not 0.0: time.monotonic() counts from boot,
    # so on a machine up for less than sync_every_s, a fresh TPU VM's, it would wait.)
    self.last_sync = -math.inf
    self.local = tempfile.mkdtemp(prefix='scale_jax_run_') if self.remote else workdir
    self.tensorboard_dir = os.path.join(self.local, 'tensorboard')
    if not self.active:
      return
    jsonl = os.path.join(self.local, 'metrics.jsonl')
    if self.remote and (epath.Path(workdir) / 'metrics.jsonl').exists():  # resumed: carry on
      pathlib.Path(jsonl).write_bytes((epath.Path(workdir) / 'metrics.jsonl').read_bytes())
    self.jsonl = open(jsonl, 'a', encoding='utf-8')
    # tensorboardX names the file by the second it opened it: a suffix keeps a resume within the
    # same second from overwriting it.
    self.tb = tensorboardX.SummaryWriter(self.tensorboard_dir, filename_suffix=f'.{time.time_ns()}')

  def write(self, step, metrics):
    if not self.active:
      return
    self.jsonl.write(evaluators.to_json({'step': step, **metrics}) + '\n')
    self.jsonl.flush()
    for k, v in metrics.items():
      self.tb.add_scalar(k, v, step)
    self.tb.flush()
    if time.monotonic() - self.last_sync >= self.sync_every_s:
      self.sync()

  def sync(self):
    """Uploads what changed in the staging directory (nothing to do for a local workdir)."""
    if not self.remote:
      return
    for root, _, files in os.walk(self.local):
      for name in files:
        local = os.path.join(root, name)
        stat = os.stat(local)
        if self.uploaded.get(local) != (stat.st_size, stat.st_mtime_ns):
          target = epath.Path(self.workdir) / os.path.relpath(local, self.local)
          target.parent.mkdir(parents=True, exist_ok=True)
          target.write_bytes(pathlib.Path(local).read_bytes())
          self.uploaded[local] = (stat.st_size, stat.st_mtime_ns)
    self.last_sync = time.monotonic()

  def close(self):
    if self.active:
      self.jsonl.close()
      self.tb.close()
    self.sync()
    if self.remote:
      shutil.rmtree(self.local, ignore_errors=True)


def _starting_state(manager, setup, config, workdir, tokenizer_path, log):
  """The TrainState a run starts from: its latest checkpoint (checked against this config
  first), else config.init_from's parameters on a fresh state, else a fresh state."""
  if manager.latest_step() is not None:
    run_config.check_tokenizer(workdir, tokenizer_path)
    run_state.check_checkpoint_matches(workdir, manager.latest_step(),
                                       setup.abstract_state.params, config)
    if run_config.path(workdir).exists():
      saved = run_config.load(workdir)
      if saved.batch_size != config.batch_size:  # every process stops alike
        raise config_check.ConfigError(
            f'{workdir} was trained at batch_size {saved.batch_size}, not {config.batch_size}: '
            f'its step {manager.latest_step()} ends at product {manager.latest_step()} x '
            f'{saved.batch_size} of the input stream, which another batch size would cut '
            f'elsewhere. Resume with --config.batch_size={saved.batch_size}, or start a new '
            f'run from its weights with --config.init_from.workdir={workdir}')
      changed = run_config.differences(saved, config)
      if changed:
        log('resuming with config changes (saved -> now): ' + '; '.join(changed))
    # The input position is not restored: it follows from the step (pipeline.train_dataset),
    # so any number of processes may resume the run. Checkpoints written before held Grain
    # iterator states under 'data', which are left alone.
    with run_state.readable(manager, manager.latest_step()):
      restored = manager.restore(manager.latest_step(), args=ocp.args.Composite(
          state=ocp.args.StandardRestore(setup.abstract_state)))
    state = restored.state
    log(f'resumed from step {int(state.step)} in {manager.directory}')
  else:
    state = setup.init(jax.random.key(config.seed))
    if config.init_from.workdir:
      params, source_step, names = run_state.load_init_from(
          state.params, setup.state_shardings.params, config.init_from, config)
      state = state.replace(params=params)
      towers = sorted({n.split('/')[0] for n in names})
      log(f'initialised {len(names)} of {len(jax.tree.leaves(params))} parameter arrays '
          f'({", ".join(towers)}) from step {source_step} of {config.init_from.workdir}; the '
          f'rest and the optimizer state start fresh (seed {config.seed})')
    else:
      log(f'starting from scratch (seed {config.seed})')
  return state


def train(config, workdir):
  """Trains to config.total_steps (resuming from the workdir); returns the final TrainState."""
  # ----------------------------------------------------------------------------------------------
  # Setup.
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  log = print if jax.process_index() == 0 else (lambda *a, **k: None)

  # ----------------------------------------------------------------------------------------------
  # Device mesh: parameters and batches are placed through logical-axis rules (sharding.py).
  mesh = sharding.make_mesh(config.mesh)

  # ----------------------------------------------------------------------------------------------
  # Model, optimizer, sharded initialisation and the train step, built as scale_jax.aot builds
  # them (the config checked first; shapes from jax.eval_shape: nothing is allocated yet).
  setup = build_train_setup(config, mesh)
  data_vocab = pipeline.vocab_size(config.data.dir)
  if data_vocab > config.model.vocab_size:
    raise config_check.ConfigError(
        f'the tokenizer in {config.data.dir} has {data_vocab} tokens but config.model.vocab_size '
        f'is {config.model.vocab_size}; raise it with --config.model.vocab_size={data_vocab}')

  # ----------------------------------------------------------------------------------------------
  # Evaluators (config.evals, by name) with a non-zero `every`, on the validation split, so that
  # choosing a checkpoint never tunes on the test split.
  periodic = {n: e for n, e in evaluators.from_config(config).items() if e.every}
  extractor = features.FeatureExtractor(setup.model, config, mesh) if periodic else None
  if periodic and 'validation' not in pipeline.splits(config.data.dir):
    raise config_check.ConfigError(
        f'config.evals.{next(iter(periodic))}.every > 0 evaluates on the validation split, which '
        f'{config.data.dir} does not have: rebuild it with --val-fraction 0.05, or set every=0')

  # ----------------------------------------------------------------------------------------------
  # Where the run starts: resume > init_from > scratch (module docstring). A resumed state is
  # restored straight onto this mesh's shardings, never initialised first. The run's config is
  # written to RUN/config.json once the checkpoint is known to fit it.
  manager = run_state.checkpoint_manager(workdir, config)
  tokenizer_path = build.tokenizer_path(config.data.dir)
  try:
    state = _starting_state(manager, setup, config, workdir, tokenizer_path, log)
  except BaseException:
    manager.close()  # (left open, its threads outlive the error and fail at interpreter exit)
    raise
  if 0 < config.total_steps <= config.optimizer.warmup_steps:
    log(f'warning: config.optimizer.warmup_steps={config.optimizer.warmup_steps} is not below '
        f'config.total_steps={config.total_steps}: the learning rate never reaches '
        f'config.optimizer.lr={config.optimizer.lr}')
  first_step = int(state.step)
  if first_step >= config.total_steps:  # RUN/config.json stays the one that trained it
    log(f'nothing to train: {workdir} is at step {first_step} and config.total_steps is '
        f'{config.total_steps}; raise it to train on')
    manager.close()
    return state
  if jax.process_index() == 0:
    run_config.save(config, workdir)
    run_config.save_tokenizer(workdir, tokenizer_path)

  # ----------------------------------------------------------------------------------------------
  # Input pipeline: this process's share of every global batch from the state's step on,
  # assembled into global arrays.
  dataset = pipeline.train_dataset(config, jax.process_index(), jax.process_count(),
                                   start_step=int(state.step))
  data_iter = iter(dataset)

  def to_global(local_batch):
    return jax.tree.map(jax.make_array_from_process_local_data, setup.batch_shardings,
                        local_batch)

  # ----------------------------------------------------------------------------------------------
  # Compile the step ahead of the loop, so step times exclude compilation. FLOPs per step: XLA's
  # count of the compiled program, and the model formula (scale_jax/model_info.py) MFU uses.
  t = time.perf_counter()
  train_step = setup.train_step.lower(setup.abstract_state, setup.abstract_batch).compile()
  step_flops = xla_flops(train_step, mesh.size)  # what the compiled program executes
  model_flops = model_info.flops_per_example(config)['train'] * config.batch_size  # the formula
  peak = config.peak_tflops_per_device * mesh.size  # of all devices, TFLOP/s
  if not peak:
    dtype = matmul_dtype(config)
    one = measure_peak_tflops(dtype)
    peak = peak_of_devices(one, list(mesh.devices.flat))
    log(f'MFU against a measured {dtype} matmul peak of {one:.2f} TFLOP/s on one '
        f'device, {peak:.2f} for the mesh (set config.peak_tflops_per_device to use the '
        f'datasheet figure)')
  log(f'compiled the train step in {time.perf_counter() - t:.1f} s ({step_flops / 1e9:.1f} GFLOP '
      f'per step as XLA counts it, {model_flops / 1e9:.1f} by the model formula)')
  if mesh.devices.flat[0].platform == 'cpu' and (tip := cpu_allocator_tip()):
    log(tip)
  # Processes finish compiling at different times (one loads the step from a compilation cache,
  # another compiles it): meet at the coordination service, which waits long, before the first
  # collective, which may not (gloo's CPU collectives give up after 30 s). No-op for one process.
  ocp.multihost.get_barrier_sync_fn()(key='scale_jax_train_step_compiled', timeout_ms=3_600_000)

  # ----------------------------------------------------------------------------------------------
  # Loop. Metrics are fetched from the device only on log steps, so the host runs ahead.
  writer = MetricsWriter(workdir)
  preemption = PreemptionNotice(config.preemption_check_every)
  profile, tracing = config.profile, False
  progress = tqdm.tqdm(total=config.total_steps, initial=first_step, desc='train',
                       disable=jax.process_index() != 0, dynamic_ncols=True)
  last_time, last_step, data_wait, paused = time.perf_counter(), first_step, 0.0, 0.0
  try:
    for step in range(first_step + 1, config.total_steps + 1):
      if profile.steps and step == profile.start:
        jax.profiler.start_trace(writer.tensorboard_dir)
        tracing = True
      t = time.perf_counter()
      batch = to_global(next(data_iter))
      data_wait += time.perf_counter() - t
      state, metrics = train_step(state, batch)
      if tracing and step == profile.start + profile.steps - 1:
        jax.block_until_ready(state)
        jax.profiler.stop_trace()
        writer.sync()
        tracing = False

      if step % config.log_every == 0 or step == config.total_steps:
        check_finite(state, metrics, manager)
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        now = time.perf_counter()
        steps, seconds = step - last_step, now - last_time - paused
        values.update(step_time=seconds / steps,
                      examples_per_sec=config.batch_size * steps / seconds,
                      data_wait=data_wait / steps,
                      tflops_per_sec=step_flops * steps / seconds / 1e12,
                      model_tflops_per_sec=model_flops * steps / seconds / 1e12,
                      mfu=model_flops * steps / seconds / 1e12 / peak)
        writer.write(step, values)
        progress.set_postfix(loss=f'{values["loss"]:.3f}')
        last_time, last_step, data_wait, paused = now, step, 0.0, 0.0

      due = {n: e for n, e in periodic.items()
             if step % e.every == 0 or step == config.total_steps}
      if due:
        t = time.perf_counter()
        results = evaluators.evaluate(due, extractor, state.params, 'validation')
        writer.write(step, evaluators.flat(results))
        paused += time.perf_counter() - t

      preempted = preemption.requested(step)
      if step % config.checkpoint_every == 0 or step == config.total_steps or preempted:
        check_finite(state, metrics, manager)  # never save a state after a non-finite step
        manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)),
                     force=True)
        writer.sync()  # a remote workdir's metrics are never behind its checkpoints
      progress.update(1)
      if preempted:
        manager.wait_until_finished()
        progress.close()
        log(f'preempted (SIGTERM): saved step {step} in {manager.directory}; exiting')
        break
  finally:
    if tracing:
      jax.profiler.stop_trace()
    preemption.close()
    progress.close()
    manager.wait_until_finished()  # an async save in flight completes, even on an error
    manager.close()
    writer.close()
  return state


if __name__ == '__main__':
  cli.run(train)
