"""Run state, shared by the trainer, the evaluators, the AOT tool and the benchmarks: the model,
the optimizer, the sharded TrainState and its checkpoints (save, restore, init_from), and the
check that a checkpoint holds the model a config builds. None of them imports another."""
import contextlib
import os
import re

import flax
import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp
from etils import epath
from flax import linen as nn
from ml_collections import FrozenConfigDict

from scale_jax import modalities, run_config, sharding
from scale_jax.model.scale import Scale


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # updates applied so far
  params: dict
  opt_state: optax.OptState
  rng: jax.Array  # uint32 key data; step s runs with fold_in(rng, s)
  # The first step whose loss or gradient was not finite (-1: none yet) and which metric it was,
  # an index into nonfinite_order(metrics). A checkpoint always holds -1: bad states are not saved.
  nonfinite_step: jax.Array
  nonfinite_metric: jax.Array


# ------------------------------------------------------------------------------------------------
# Optimizer.

def param_name(path) -> str:
  """'encoders_text/block_0/mlp_in/kernel': a parameter's dict keys joined by '/' (the .value of
  nn.Partitioned boxes left out). The regexes of the config match these."""
  return '/'.join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def lr_multiplier(name: str, rules) -> float:
  """The multiplier of the first (regex, multiplier) rule whose regex finds the name; else 1."""
  for pattern, multiplier in rules:
    if re.search(pattern, name):
      return float(multiplier)
  return 1.0


def scale_by_lr_multipliers(rules) -> optax.GradientTransformation:
  """Multiplies each parameter's update by its lr_multiplier. Placed after AdamW, it scales the
  whole step (weight decay included, as optax's adamw scales decay by the learning rate)."""

  def update(updates, state, params=None):
    del params
    def scale(path, u):
      m = lr_multiplier(param_name(path), rules)
      return u if m == 1.0 else u * m
    return jax.tree_util.tree_map_with_path(scale, updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


# optimizer.decay -> the schedule after warm-up, from the peak lr over `steps`.
DECAY_SCHEDULES = {
    'cosine': lambda lr, steps: optax.cosine_decay_schedule(lr, steps, alpha=0.01),  # to 1%
    'linear': lambda lr, steps: optax.linear_schedule(lr, 0.0, steps),  # the paper's, to 0
}


def make_optimizer(config):
  """AdamW with linear warm-up then cosine (to 1% of the peak) or linear (to 0) decay, global-norm
  clipping, no weight decay on biases, norms and embeddings (only on `kernel`s), and per-parameter
  learning-rate multipliers (config.optimizer.lr_multipliers)."""
  o = config.optimizer
  decay_steps = max(config.total_steps - o.warmup_steps, 1)
  if o.decay not in DECAY_SCHEDULES:
    raise ValueError(f'optimizer.decay must be one of {list(DECAY_SCHEDULES)}, not {o.decay!r}')
  decay = DECAY_SCHEDULES[o.decay](o.lr, decay_steps)
  schedule = optax.join_schedules(
      [optax.linear_schedule(0.0, o.lr, o.warmup_steps), decay], [o.warmup_steps])
  decay_mask = lambda params: jax.tree_util.tree_map_with_path(
      lambda path, _: param_name(path).endswith('kernel'), params)
  parts = [optax.clip_by_global_norm(o.clip_norm),
           optax.adamw(schedule, o.b1, o.b2, weight_decay=o.weight_decay, mask=decay_mask)]
  if o.lr_multipliers:
    parts.append(scale_by_lr_multipliers(tuple(o.lr_multipliers)))
  return optax.chain(*parts), schedule


# ------------------------------------------------------------------------------------------------
# Model and sharded initialisation.

def build_model(config, mesh=None):
  """The model of `config`; on `mesh` its activation constraints take effect (pass the mesh the
  step runs on: without one XLA alone places activations)."""
  return Scale(FrozenConfigDict(config), mesh)


def sharded_state_init(model, tx, config, mesh):
  """Returns (jitted init producing a sharded TrainState from a PRNG key, its shardings).

  Shapes come from jax.eval_shape, so no full copy of the model ever lands on one device.
  """
  batch = modalities.dummy_batch(config, 2)
  model = model.clone(mesh=None)  # the dummy batch of 2 would not split over the batch axes

  def init_boxed(rng):  # parameters carry their logical axis names (nn.Partitioned boxes)
    params = model.init(rng, batch)['params']
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=jax.random.key_data(jax.random.fold_in(rng, 1)),
                      nonfinite_step=jnp.full((), -1, jnp.int32),
                      nonfinite_metric=jnp.full((), -1, jnp.int32))

  abstract = jax.eval_shape(init_boxed, jax.random.key(0))
  shardings = sharding.tree_shardings(mesh, abstract)
  init = jax.jit(lambda rng: nn.unbox(init_boxed(rng)), out_shardings=shardings)
  return init, shardings


# ------------------------------------------------------------------------------------------------
# Checkpoints.

def checkpoint_manager(workdir, config):
  """Asynchronous; keeps the latest config.checkpoint_keep plus every multiple of
  config.checkpoint_keep_every. Temporary directories of a save cut short are removed."""
  keep = [ocp.checkpoint_managers.LatestN(config.checkpoint_keep)]
  if config.checkpoint_keep_every:
    keep.append(ocp.checkpoint_managers.EveryNSteps(config.checkpoint_keep_every))
  return ocp.CheckpointManager(
      checkpoint_dir(workdir),
      options=ocp.CheckpointManagerOptions(
          preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(keep),
          enable_async_checkpointing=True, cleanup_tmp_directories=True),
      item_names=('state', 'data'))


def abstract_like(state, shardings):
  """Restore targets: shapes, dtypes and the shardings of *this* run's mesh."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      state, shardings)


def _flat_params(tree) -> dict:
  return {param_name(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def checkpoint_dir(workdir) -> epath.Path:
  """RUN/checkpoints; RUN may be a local directory or a gs:// URL."""
  local = '://' not in str(workdir)
  return epath.Path(os.path.abspath(workdir) if local else workdir) / 'checkpoints'


class UnreadableCheckpoint(ValueError):
  """A checkpoint whose files are damaged or missing (a disk that failed, files deleted)."""


@contextlib.contextmanager
def readable(manager, step):
  """Turns an error of Orbax reading checkpoint `step` (a tensorstore error, a KeyError for a
  missing item, hundreds of lines of asynchronous traceback) into one message that names the
  checkpoint and what to do."""
  try:
    yield
  except Exception as e:  # pylint: disable=broad-except  (any damage reads as some error)
    lines = str(e).strip().splitlines()
    reason = (f'{type(e).__name__}: {lines[0].split(" See full TensorStore")[0][:300]}'
              if lines else type(e).__name__)
    path = manager.directory / str(step)
    others = sorted(s for s in manager.all_steps() if s < step)
    if others:
      what = (f'the checkpoints before it: {others}. To resume from step {others[-1]}, move '
              f'{path} out of {manager.directory}; to evaluate one, pass --step {others[-1]}')
    else:
      what = 'no earlier checkpoint is there: start the run again in a new workdir'
    raise UnreadableCheckpoint(f'checkpoint {step} in {manager.directory} cannot be read '
                               f'({reason}); {what}') from None


def _saved_params(source, step) -> dict:
  """{name: shape and dtype metadata} of the parameters in checkpoint `step` of `source`."""
  with readable(source, step):
    return _flat_params(source.item_metadata(step)['state']['params'])


def _restore_params_only(source, step, target) -> dict:
  """The parameters `target` names ({'params': ShapeDtypeStructs}) from checkpoint `step`, onto
  their shardings; the optimizer state is not read."""
  with readable(source, step):
    return source.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True))).state


def _read_only_manager(workdir):
  return ocp.CheckpointManager(checkpoint_dir(workdir),
                               item_handlers={'state': ocp.PyTreeCheckpointHandler()},
                               options=ocp.CheckpointManagerOptions(
                                   read_only=True, save_interval_steps=0, create=False))


def _config_hint(workdir, config) -> str:
  """What differs between the config saved in `workdir` and this one, for error messages."""
  try:
    changed = run_config.differences(run_config.load(workdir), config)
  except FileNotFoundError:
    return f' ({run_config.path(workdir)} is missing: compare the configs by hand)'
  if not changed:
    return ''
  return (f'. Fields that differ from {run_config.path(workdir)} (saved -> here):\n  '
          + '\n  '.join(changed))


def check_checkpoint_matches(workdir, step, params, config):
  """Raises ValueError if the parameters saved at `step` in `workdir` are not those of this
  config's model (a tree-structure mismatch inside Orbax names neither the cause nor the fix)."""
  with contextlib.closing(_read_only_manager(workdir)) as source:
    saved = {n: tuple(x.shape) for n, x in _saved_params(source, step).items()}
  ours = {n: tuple(x.shape) for n, x in _flat_params(params).items()}
  if saved == ours:
    return
  def where(n):
    if n not in ours:
      return f'{n}: only in the checkpoint'
    return f'{n}: only here' if n not in saved else f'{n}: {saved[n]} saved, {ours[n]} here'
  diff = sorted(n for n in set(saved) | set(ours) if saved.get(n) != ours.get(n))
  shown = ', '.join(where(n) for n in diff[:4])
  raise ValueError(
      f'the checkpoint at step {step} in {workdir} holds another model than this config builds: '
      f'{len(diff)} parameter arrays differ ({shown}{", ..." if len(diff) > 4 else ""})'
      f'{_config_hint(workdir, config)}\nUse the run\'s own config: leave out --config (it '
      f'is read from {run_config.path(workdir)}) or repeat the overrides it was trained with.')


def load_init_from(params, shardings, init_from, config):
  """params with those whose name `init_from.include` finds copied from the latest checkpoint of
  run `init_from.workdir`, onto this run's shardings. Returns (params, its step, copied names)."""
  ours, our_shardings = _flat_params(params), _flat_params(shardings)
  nest = lambda d: flax.traverse_util.unflatten_dict({tuple(n.split('/')): v for n, v in d.items()})
  with contextlib.closing(_read_only_manager(init_from.workdir)) as source:
    directory, step = source.directory, source.latest_step()
    if step is None:
      raise FileNotFoundError(f'config.init_from.workdir: no checkpoint in {directory}')
    saved = _saved_params(source, step)
    names = [n for n in ours if re.search(init_from.include, n) and n in saved]
    if not names:
      raise ValueError(f'config.init_from.include={init_from.include!r} selects no parameter '
                       f'that the checkpoint in {directory} holds')
    for n in names:
      if tuple(saved[n].shape) != ours[n].shape:
        raise ValueError(f'init_from: {n} has shape {tuple(saved[n].shape)} in {directory}, '
                         f'{ours[n].shape} here{_config_hint(init_from.workdir, config)}')
    target = {'params': nest({n: jax.ShapeDtypeStruct(ours[n].shape, ours[n].dtype,
                                                      sharding=our_shardings[n]) for n in names})}
    restored = _restore_params_only(source, step, target)
  copied = _flat_params(restored['params'])
  return nest({n: copied.get(n, x) for n, x in ours.items()}), step, names


def restore_params(config, workdir, mesh, step=None):
  """(parameters of checkpoint `step` of run `workdir` (default: the latest), on this mesh's
  shardings; the step). Checks first that the checkpoint holds this config's model."""
  model = build_model(config)
  tx, _ = make_optimizer(config)
  init, shardings = sharded_state_init(model, tx, config, mesh)
  abstract = abstract_like(jax.eval_shape(init, jax.random.key(0)), shardings)
  with contextlib.closing(_read_only_manager(workdir)) as source:
    steps = source.all_steps()
    step = source.latest_step() if step is None else int(step)
    if step is None or step not in steps:
      raise FileNotFoundError(
          f'no checkpoint {"at all" if step is None else f"at step {step}"} in '
          f'{source.directory} (steps there: {sorted(steps) or "none"}); train first with '
          f'`python -m scale_jax.train --config ... --workdir {workdir}`')
    check_checkpoint_matches(workdir, step, abstract.params, config)
    restored = _restore_params_only(source, step, {'params': abstract.params})
  return restored['params'], step
