"""Checks a run's config before any work starts: every problem at once, each message naming the
field and a value that works (a shape error inside a Grain worker or a silently truncated head
names nothing)."""
from scale_jax import losses, modalities, sharding, state
from scale_jax.model import layers


class ConfigError(ValueError):
  """A config that cannot run; the message lists every problem found."""


def _model_problems(m) -> list:
  problems = []
  for field in ('heads', 'media_heads'):
    heads = m.get(field, 0)
    if heads and m.width % heads:
      fits = [h for h in range(1, heads + 1) if m.width % h == 0][-1]
      problems.append(f'config.model.width={m.width} does not split into config.model.{field}='
                      f'{heads} heads; e.g. --config.model.{field}={fits}')
  choices = {'weighting': losses.WEIGHTINGS, 'contrastive': ('infonce', 'nt_xent'),
             'absent': ('mask', 'zero'), 'masked_heads_on': ('joint', 'encoder'),
             'remat': tuple(layers.REMAT_POLICIES), 'matmul': tuple(layers.MATMULS),
             'attention': tuple(layers.ATTENTIONS),
             'dtype': ('float32', 'bfloat16')}
  for field, allowed in choices.items():
    if field in ('matmul', 'attention') and field not in m:
      continue  # a run saved before the field existed: the model takes 'float32', 'jax'
    if m[field] not in allowed:
      problems.append(f'config.model.{field}={m[field]!r}: one of {", ".join(allowed)}')
  return problems


def _joint_problems(config) -> list:
  """A joint co-transformer that no loss reaches would stay at its initialisation, and the
  product features (its outputs) with it."""
  m = config.model
  heads = m.masked_heads_on == 'joint' and modalities.masked(config)
  weights = m.weighting == 'harmonized' and not m.stop_gradient_weights
  if not m.joint_layers or heads or weights:
    return []
  return [f'config.model.joint_layers={m.joint_layers}: the joint co-transformer would never '
          f'train. Its outputs reach the loss through the masked heads (masked_heads_on=\'joint\' '
          f'with a masked objective on; here {m.masked_heads_on!r}) or through the harmonized '
          f'weights (weighting=\'harmonized\' with stop_gradient_weights=False; here '
          f'{m.weighting!r}, {m.stop_gradient_weights}). Set one of those (the released code: '
          f'--config.model.stop_gradient_weights=False), or --config.model.joint_layers=0']


def _loss_problems(config, names) -> list:
  """A run in which no loss is on would train nothing and still report success."""
  if modalities.masked(config) or (len(names) > 1 and config.loss.contrastive > 0):
    return []
  objectives = [modalities.get(m).objective for m in names]
  return [f'config.loss: no loss is on for config.modalities={tuple(names)} (contrastive needs '
          f'two modalities and a coefficient above 0; the masked objectives '
          f'{", ".join(objectives)} a coefficient and a mask_rate above 0): nothing would train']


def _optimizer_problems(o) -> list:
  """An optimizer whose steps climb the loss (lr < 0) or diverge would train and report success."""
  limits = {'lr': (0.0, None, False, 1e-3), 'warmup_steps': (0, None, True, 100),
            'weight_decay': (0.0, None, True, 0.05), 'b1': (0.0, 1.0, True, 0.9),
            'b2': (0.0, 1.0, True, 0.98), 'clip_norm': (0.0, None, False, 1.0)}
  problems = []
  for field, (low, high, low_allowed, example) in limits.items():
    value = o.get(field)
    if value is None:
      continue
    if not (value >= low if low_allowed else value > low) or (high is not None and value >= high):
      span = f'{">=" if low_allowed else ">"} {low}' + ('' if high is None else f' and < {high}')
      problems.append(f'config.optimizer.{field}={value} must be {span}; e.g. '
                      f'--config.optimizer.{field}={example}')
  if o.get('decay') not in state.DECAY_SCHEDULES:
    problems.append(f'config.optimizer.decay={o.get("decay")!r}: one of '
                    f'{", ".join(state.DECAY_SCHEDULES)}')
  return problems


def _split_problems(m, mesh) -> list:
  """Parameter dimensions the mesh splits must divide evenly (sharding.LOGICAL_RULES): the
  model width over fsdp; heads, MLP widths, the token head (the width) and the vocabulary over
  tensor."""
  fsdp, tensor = mesh.shape['fsdp'], mesh.shape['tensor']
  dims = [('width', m.width, 'fsdp', fsdp)]
  for field in ('heads', 'media_heads', 'mlp_dim', 'media_mlp_dim', 'width', 'vocab_size'):
    if m.get(field):
      dims.append((field, m[field], 'tensor', tensor))
  return [f'config.model.{field}={size} does not split over config.mesh.{axis}={parts} devices; '
          f'choose a mesh.{axis} that divides it (e.g. '
          f'{max(d for d in range(1, parts + 1) if size % d == 0)})'
          for field, size, axis, parts in dims if size % parts]


def _batch_problems(config, mesh) -> list:
  shards = mesh.shape['data'] * mesh.shape['fsdp']
  problems = []
  for field, size, parts in (('batch_size', config.batch_size, shards * config.microbatches),
                             ('eval.batch_size', config.eval.batch_size, shards)):
    if size % parts or size < parts:
      what = (f'{config.microbatches} microbatches x {shards} devices' if field == 'batch_size'
              and config.microbatches > 1 else f'the {shards} devices')
      problems.append(f'config.{field}={size} does not split over {what} of mesh axes data x '
                      f'fsdp; e.g. --config.{field}={max(parts, size // parts * parts)}')
  problems += _split_problems(config.model, mesh)
  # Each process feeds its own rows of the batch, which is split over data x fsdp and copied
  # over tensor: a tensor group needs one process's rows, so it must lie within one process.
  spanned = sharding.processes_split_by(mesh, 'tensor')
  if spanned is not None:
    per_process = mesh.size // len({d.process_index for d in mesh.devices.flat})
    problems.append(
        f'config.mesh.tensor={mesh.shape["tensor"]} puts devices of processes {spanned} in one '
        f'tensor group, but each process loads different batch rows and a tensor group needs the '
        f'same rows on all its devices: keep tensor within a host (mesh.tensor <= '
        f'{per_process}, the devices per process, and mesh.dcn_tensor=1) and split across '
        f'hosts with data or fsdp')
  return problems


def check(config, mesh=None) -> None:
  """Raises ConfigError listing every problem; `mesh` adds the batch-size checks."""
  try:
    names = modalities.active(config)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  problems = []
  for m in names:
    problems += modalities.get(m).check(config[m])
  problems += _model_problems(config.model)
  problems += _joint_problems(config)
  for objective, coefficient in config.loss.items():
    if coefficient < 0:
      problems.append(f'config.loss.{objective}={coefficient} must be >= 0')
  problems += _loss_problems(config, names)
  problems += _optimizer_problems(config.optimizer)
  if config.checkpoint_keep < 1:
    problems.append(f'config.checkpoint_keep={config.checkpoint_keep} would keep no checkpoint '
                    f'(a resume or an evaluation would find none); e.g. --config.checkpoint_keep=2')
  for field, example in (('log_every', 50), ('checkpoint_every', 1000)):
    if config[field] < 1:
      problems.append(f'config.{field}={config[field]} must be at least 1 (the last step is '
                      f'always logged and saved); e.g. --config.{field}={example}')
  if mesh is not None:
    problems += _batch_problems(config, mesh)  # and the mesh's process layout
  if problems:
    raise ConfigError('the config cannot run:\n  ' + '\n  '.join(problems))
