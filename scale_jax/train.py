r"""Pretrains SCALE. Read top to bottom: setup, mesh, data, model and optimizer, sharded init,
train step, checkpoint restore, loop.

    python -m scale_jax.train --config configs/demo.py --workdir DIR [--config.x=y ...]

Resumes from the latest checkpoint in DIR/checkpoints when there is one (parameters, optimizer
state, step and the input pipeline's position). Writes DIR/metrics.jsonl and TensorBoard events
under DIR/tensorboard.
"""
import functools
import json
import os
import time

import flax
import grain
import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp
import tensorboardX
import tqdm
from flax import linen as nn
from ml_collections import FrozenConfigDict

from scale_jax import cli, losses, sharding
from scale_jax.data import pipeline
from scale_jax.model.scale import Scale


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: dict
  opt_state: optax.OptState


def make_optimizer(config):
  """AdamW with linear warm-up then cosine (to 1% of the peak) or linear (to 0) decay, global-norm
  clipping, and no weight decay on biases, norms and embeddings (only on `kernel`s)."""
  o = config.optimizer
  decay_steps = max(config.total_steps - o.warmup_steps, 1)
  if o.decay == 'cosine':
    decay = optax.cosine_decay_schedule(o.lr, decay_steps, alpha=0.01)
  elif o.decay == 'linear':  # the paper's schedule
    decay = optax.linear_schedule(o.lr, 0.0, decay_steps)
  else:
    raise ValueError(f"optimizer.decay must be 'cosine' or 'linear', not {o.decay!r}")
  schedule = optax.join_schedules(
      [optax.linear_schedule(0.0, o.lr, o.warmup_steps), decay], [o.warmup_steps])
  decay_mask = lambda params: jax.tree_util.tree_map_with_path(
      lambda path, _: 'kernel' in jax.tree_util.keystr(path), params)
  tx = optax.chain(optax.clip_by_global_norm(o.clip_norm),
                   optax.adamw(schedule, o.b1, o.b2, weight_decay=o.weight_decay,
                               mask=decay_mask))
  return tx, schedule


def build_model(config):
  return Scale(FrozenConfigDict(config))


def sharded_state_init(model, tx, config, mesh):
  """Returns (jitted init producing a sharded TrainState from a PRNG key, its shardings).

  Shapes come from jax.eval_shape, so no full copy of the model ever lands on one device.
  """
  batch = pipeline.dummy_batch(config, 2)

  def init_boxed(rng):  # parameters carry their logical axis names (nn.Partitioned boxes)
    params = model.init(rng, batch)['params']
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

  abstract = jax.eval_shape(init_boxed, jax.random.key(0))
  shardings = sharding.tree_shardings(mesh, abstract)
  init = jax.jit(lambda rng: nn.unbox(init_boxed(rng)), out_shardings=shardings)
  return init, shardings


def make_train_step(model, tx, schedule, config, state_shardings, batch_shardings):
  """The jitted step (state, batch) -> (state, metrics); the old state's buffers are donated."""

  @functools.partial(jax.jit, in_shardings=(state_shardings, batch_shardings),
                     out_shardings=(state_shardings, None), donate_argnums=0)
  def train_step(state, batch):
    def loss_fn(params):
      return losses.scale_objective(model.apply({'params': params}, batch), batch, config)

    (_, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    terms.update(grad_norm=optax.tree.norm(grads), lr=schedule(state.step))
    return TrainState(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                      opt_state=opt_state), terms

  return train_step


def xla_flops(compiled, num_devices: int) -> float:
  """FLOPs of one call of a compiled computation on all devices, as XLA counts them.

  XLA counts the partitioned (per-device) program; work replicated across devices, such as the
  update of replicated parameters, is counted once per device.
  """
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get('flops', 0.0)) * num_devices


def checkpoint_manager(workdir, config):
  return ocp.CheckpointManager(
      os.path.join(os.path.abspath(workdir), 'checkpoints'),
      options=ocp.CheckpointManagerOptions(
          max_to_keep=config.checkpoint_keep, enable_async_checkpointing=True),
      item_names=('state', 'data'))


def abstract_like(state, shardings):
  """Restore targets: shapes, dtypes and the shardings of *this* run's mesh."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      state, shardings)


class MetricsWriter:
  """metrics.jsonl (one object per logged step) and TensorBoard events; process 0 only."""

  def __init__(self, workdir):
    self.active = jax.process_index() == 0
    if self.active:
      self.jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a', encoding='utf-8')
      self.tb = tensorboardX.SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def write(self, step, metrics):
    if not self.active:
      return
    self.jsonl.write(json.dumps({'step': step, **metrics}) + '\n')
    self.jsonl.flush()
    for k, v in metrics.items():
      self.tb.add_scalar(k, v, step)
    self.tb.flush()

  def close(self):
    if self.active:
      self.jsonl.close()
      self.tb.close()


def train(config, workdir):
  """Trains to config.total_steps (resuming from the workdir); returns the final TrainState."""
  # ----------------------------------------------------------------------------------------------
  # Setup.
  os.makedirs(workdir, exist_ok=True)
  data_vocab = pipeline.vocab_size(config.data.dir)
  if data_vocab > config.model.vocab_size:
    raise ValueError(f'the tokenizer in {config.data.dir} has {data_vocab} tokens but '
                     f'config.model.vocab_size is {config.model.vocab_size}; raise it with '
                     f'--config.model.vocab_size={data_vocab}')

  # ----------------------------------------------------------------------------------------------
  # Device mesh: parameters and batches are placed through logical-axis rules (sharding.py).
  mesh = sharding.make_mesh(config.mesh)

  # ----------------------------------------------------------------------------------------------
  # Input pipeline: this process's share of every global batch.
  dataset = pipeline.train_dataset(config, jax.process_index(), jax.process_count())
  data_iter = iter(dataset)

  # ----------------------------------------------------------------------------------------------
  # Model, optimizer and sharded initialisation.
  model = build_model(config)
  tx, schedule = make_optimizer(config)
  init, state_shardings = sharded_state_init(model, tx, config, mesh)
  batch_shardings = sharding.batch_sharding(mesh, pipeline.dummy_batch(config, 1))

  # ----------------------------------------------------------------------------------------------
  # The train step: one jitted function; the state's buffers are donated and updated in place.
  # Compiled ahead of the loop, so step times exclude compilation; XLA's FLOP count of the
  # compiled step gives the achieved FLOP rate.
  state = init(jax.random.key(config.seed))
  batch_shapes = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct((config.batch_size,) + x.shape[1:], x.dtype, sharding=s),
      pipeline.dummy_batch(config, 1), batch_shardings)
  t = time.perf_counter()
  train_step = make_train_step(model, tx, schedule, config, state_shardings, batch_shardings)
  train_step = train_step.lower(state, batch_shapes).compile()
  step_flops = xla_flops(train_step, mesh.size)
  print(f'compiled the train step in {time.perf_counter() - t:.1f} s '
        f'({step_flops / 1e9:.1f} GFLOP per step)')

  def to_global(local_batch):
    return jax.tree.map(jax.make_array_from_process_local_data, batch_shardings, local_batch)

  # ----------------------------------------------------------------------------------------------
  # Start from scratch, or resume from the latest checkpoint in the workdir.
  manager = checkpoint_manager(workdir, config)
  if manager.latest_step() is not None:
    restored = manager.restore(manager.latest_step(), args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_like(state, state_shardings)),
        data=grain.checkpoint.CheckpointRestore(data_iter)))
    state = restored.state
    print(f'resumed from step {int(state.step)} in {manager.directory}')

  # ----------------------------------------------------------------------------------------------
  # Loop. Metrics are fetched from the device only on logging steps, so the host runs ahead.
  writer = MetricsWriter(workdir)
  first_step = int(state.step)
  progress = tqdm.tqdm(total=config.total_steps, initial=first_step, desc='train',
                       disable=jax.process_index() != 0, dynamic_ncols=True)
  last_time, last_step, data_wait = time.perf_counter(), first_step, 0.0
  for step in range(first_step + 1, config.total_steps + 1):
    t = time.perf_counter()
    batch = to_global(next(data_iter))
    data_wait += time.perf_counter() - t
    state, terms = train_step(state, batch)
    if step % config.log_every == 0 or step == config.total_steps:
      metrics = {k: float(v) for k, v in jax.device_get(terms).items()}
      now = time.perf_counter()
      elapsed = now - last_time
      metrics.update(step_time=elapsed / (step - last_step),
                     examples_per_sec=config.batch_size * (step - last_step) / elapsed,
                     tflops_per_sec=step_flops * (step - last_step) / elapsed / 1e12,
                     data_wait=data_wait / (step - last_step))
      writer.write(step, metrics)
      progress.set_postfix(loss=f'{metrics["loss"]:.3f}')
      last_time, last_step, data_wait = now, step, 0.0
    if step % config.checkpoint_every == 0 or step == config.total_steps:
      manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iter)),
          force=True)
    progress.update(1)
  progress.close()
  manager.wait_until_finished()
  manager.close()
  writer.close()
  return state


if __name__ == '__main__':
  cli.run(train)
