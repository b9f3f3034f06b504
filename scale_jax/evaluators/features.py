"""Product features for evaluation, computed once per evaluation and shared by every evaluator.

A combination is a tuple of modalities, written 'text+image' in configs. The feature of a product
for a combination (config.eval):
  feature   'fused': each modality's global token after the joint co-transformer (the paper's
            downstream feature), or 'z': the pre-fusion contrastive embeddings;
  pooling   'mean': the L2-normalised mean of the combination's L2-normalised vectors (cosine
            retrieval), or 'sum': their plain sum (the authors' code);
  protocol  'only': the product is encoded from the combination's modalities alone (the others
            marked absent, as if the merchant had not given them), or 'full': encoded from all
            its modalities and the combination's vectors pooled afterwards (the authors'
            protocol, where the fused 'text' vector has already seen the image).
Only the modalities a product has count; a product with none of a combination's modalities has
no feature for it and is left out of that combination's row.

Every process reads the same batches and takes part in the same computations; the features are
gathered back to every process (multi-host safe).
"""
import dataclasses

import jax
import tqdm
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from scale_jax import losses, modalities, sharding
from scale_jax.data import pipeline

FEATURES, POOLINGS, PROTOCOLS = ('fused', 'z'), ('mean', 'sum'), ('only', 'full')


def name(combination) -> str:
  return '+'.join(combination)


_DROPPED_WARNED = set()


def combinations(config, requested=None) -> list:
  """The requested combinations ('text+image' strings; default config.eval.combinations) that
  the run can form, each a tuple in MODALITIES order ('image+text' is 'text+image'); 'all' is
  the run's modalities."""
  active = modalities.active(config)
  out, dropped = [], []
  for text in requested or config.eval.combinations:
    chosen = set(active if text == 'all' else text.split('+'))
    unknown = chosen - set(modalities.MODALITIES)
    if unknown:
      raise ValueError(f'combination {text!r}: {sorted(unknown)} are not modalities '
                       f'({", ".join(modalities.MODALITIES)})')
    combination = tuple(m for m in modalities.MODALITIES if m in chosen)
    if not chosen <= set(active):
      dropped.append(text)
    elif combination not in out:
      out.append(combination)
  if dropped and out and tuple(dropped) not in _DROPPED_WARNED:  # once, not once per evaluator
    _DROPPED_WARNED.add(tuple(dropped))
    logging.warning('combinations %s left out: config.modalities=%s does not have all of their '
                    'modalities', ', '.join(dropped), active)
  if not out:  # an empty table and a run that reports nothing
    raise ValueError(f'none of the combinations {tuple(requested or config.eval.combinations)} '
                     f'can be formed from config.modalities={active}; e.g. '
                     f'--config.eval.combinations="(\'all\',)"')
  return out


def restrict(batch, keep, names):
  """The batch with only the modalities that `keep` [M] marks: the others absent (no valid
  position), as if the merchant had not given them."""
  batch = dict(batch, present=batch['present'] & keep)
  for i, m in enumerate(names):
    batch[f'{m}_valid'] = batch[f'{m}_valid'] & keep[i]
  return batch


@dataclasses.dataclass
class SplitFeatures:
  """Features of one split's products, row i for record rows[i] of the split."""
  split: str
  rows: np.ndarray  # int [N]
  labels: np.ndarray  # int [N], dense category ids
  instances: np.ndarray  # int [N], dense instance ids
  features: dict  # combination name -> float32 [N, D]
  has: dict  # combination name -> bool [N]: the product has one of its modalities


class FeatureExtractor:
  """extractor(params, split, combinations) -> SplitFeatures. The jitted functions are built
  once, so evaluating again during training compiles nothing new."""

  def __init__(self, model, config, mesh):
    self.model, self.config, self.mesh = model, config, mesh
    e = config.eval
    for field, value, allowed in (('feature', e.feature, FEATURES),
                                  ('pooling', e.pooling, POOLINGS),
                                  ('protocol', e.protocol, PROTOCOLS)):
      if value not in allowed:
        raise ValueError(f'config.eval.{field}={value!r}: one of {", ".join(allowed)}')
    self.names = modalities.active(config)
    self.shardings = sharding.batch_sharding(mesh, modalities.dummy_batch(config, 1, train=False))

    @jax.jit
    def vectors(params, batch, keep):
      """[B, M, D] L2-normalised per-modality vectors and the presence they were computed with."""
      batch = restrict(batch, keep, self.names)
      out = model.apply({'params': params}, batch)
      return losses.l2_normalize(out[e.feature]), batch['present']

    @jax.jit
    def pool(v, present, keep):
      chosen = present & keep
      total = jnp.sum(jnp.where(chosen[..., None], v, 0.0), axis=1)
      return (losses.l2_normalize(total) if e.pooling == 'mean' else total), jnp.any(chosen, 1)

    @jax.jit
    def weight_sums(params, batch):
      return losses.weight_sums(model.apply({'params': params}, batch), batch['present'], config)

    self._vectors, self._pool, self._weight_sums = vectors, pool, weight_sums

  def device_batches(self, split, rows, what=None):
    """(host batch, the same on the mesh, real examples) of records `rows` of a split, in
    config.eval.batch_size batches; `what` names a progress bar (None: no bar)."""
    size = self.config.eval.batch_size
    batches = pipeline.eval_batches(self.config, split, size, rows)
    for batch, n in tqdm.tqdm(batches, desc=f'{what}: {split}', total=-(-len(rows) // size),
                              unit='batch', leave=False,
                              disable=what is None or jax.process_index() != 0):
      on_device = jax.tree.map(
          lambda s, x: jax.make_array_from_process_local_data(s, x, x.shape), self.shardings,
          batch)
      yield batch, on_device, n

  @staticmethod
  def gather(x) -> np.ndarray:
    """The global value of a (possibly multi-process) array, on every process."""
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))

  def _keep(self, combination):
    return jnp.array([m in combination for m in self.names])

  def __call__(self, params, split, combos, max_products=0) -> SplitFeatures:
    """Features of every combination in `combos` for the split's products (a seeded sample of
    max_products of them; 0: all)."""
    rows = pipeline.eval_rows(self.config, split, max_products, self.config.seed)
    gather = self.gather
    everything = self._keep(self.names)
    feats, has = {name(c): [] for c in combos}, {name(c): [] for c in combos}
    labels, instances = [], []
    for batch, on_device, n in self.device_batches(split, rows, 'features'):
      if self.config.eval.protocol == 'full':
        v, present = self._vectors(params, on_device, everything)
      for c in combos:
        keep = self._keep(c)
        if self.config.eval.protocol == 'only':
          v, present = self._vectors(params, on_device, keep)
        pooled, any_of = self._pool(v, present, keep)
        feats[name(c)].append(gather(pooled)[:n])
        has[name(c)].append(gather(any_of)[:n])
      labels.append(batch['label'][:n])
      instances.append(batch['instance'][:n])
    return SplitFeatures(split, rows, np.concatenate(labels), np.concatenate(instances),
                         {k: np.concatenate(v) for k, v in feats.items()},
                         {k: np.concatenate(v) for k, v in has.items()})

  def mean_weights(self, params, split, max_products=0) -> np.ndarray:
    """[M, M] the self-harmonized weight matrix averaged over the split's products that have
    both modalities of each entry (the diagonal weighs the masked objectives)."""
    rows = pipeline.eval_rows(self.config, split, max_products, self.config.seed)
    total, count = 0.0, 0
    for _, on_device, _ in self.device_batches(split, rows, 'weights'):
      s, c = self._weight_sums(params, on_device)
      total, count = total + self.gather(s), count + self.gather(c)
    return total / np.maximum(count, 1)
