"""The SCALE objective: self-harmonized weights, contrastive terms over all modality pairs, and the
five masked objectives (docs/method.md). Weights multiply per-product losses, not logits."""
import itertools

import jax
import jax.numpy as jnp

from scale_jax import modalities

WEIGHTINGS = ('harmonized', 'learned', 'uniform', 'none')
# Stands in for -inf in masked logits: -inf makes fully masked rows NaN, and NaN gradients survive
# a later jnp.where.
NEG = -1e9


def l2_normalize(x, axis=-1):
  """x / |x|, with a finite gradient at x = 0 (absent modalities give zero rows)."""
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=axis, keepdims=True), 1e-12))


def harmonized_weights(v, present, mode='harmonized', log_variances=None):
  """Per-product weight matrices G [B, M, M] from modality vectors v [B, M, D].

  'harmonized': the spec's R = C * softmax(C) over present modalities, rows L2-normalised, with
  one change: C is the cosine similarity rescaled to [0, 1], (1 + cos) / 2. With raw cosines a
  pair pointing apart gets a negative weight, which turns its loss into one to maximise.
  'learned': G = exp(-s) for a learned matrix s [M, M], one entry per term, the same for every
  product; trained with the regulariser of learned_weight_regularizer (uncertainty weighting,
  docs/method.md). 'uniform': every present pair alike, rows L2-normalised (the ablation).
  'none': weight 1 for every present pair (plain multi-pair contrastive, as CLIP).
  Rows and columns of absent modalities are zero in every mode.
  """
  pair_present = present[:, :, None] & present[:, None, :]
  if mode == 'harmonized':
    v = l2_normalize(v)
    c = 0.5 * (1.0 + jnp.einsum('bid,bjd->bij', v, v))
    r = c * jax.nn.softmax(jnp.where(pair_present, c, NEG), axis=-1)
  elif mode == 'learned':
    r = jnp.broadcast_to(jnp.exp(-log_variances), pair_present.shape)
  elif mode in ('uniform', 'none'):
    r = jnp.ones(pair_present.shape, v.dtype)
  else:
    raise ValueError(f'weighting must be one of {WEIGHTINGS}, not {mode!r}')
  r = jnp.where(pair_present, r, 0.0)
  return r if mode in ('none', 'learned') else l2_normalize(r)


def learned_weight_regularizer(log_variances, config):
  """What keeps 'learned' weights from collapsing: + s for every term weighted by exp(-s), with
  the term's coefficient (Kendall, Gal and Cipolla 2018). Minimising exp(-s) L + s over s gives
  exp(-s) = 1 / L: every term keeps a finite, positive weight. Minimising the weighted loss
  alone would drive every weight to its bound (a softmax score matrix puts all of a row's weight
  on its easiest term). A contrastive pair's two directions each take half of s_ij + s_ji."""
  names, s = modalities.active(config), log_variances
  pairs = sum(0.5 * (s[i, j] + s[j, i]) for i, j in itertools.combinations(range(len(names)), 2))
  total = config.loss.contrastive * pairs
  for k in modalities.masked(config):
    i = names.index(k)
    total += config.loss[modalities.get(k).objective] * s[i, i]
  return total


def _mean_over(x, valid, count=None):
  """Mean of x where valid; `count` replaces the number of valid entries as the divisor (a
  microbatch's share of a mean over the whole batch)."""
  count = jnp.sum(valid) if count is None else count
  return jnp.sum(jnp.where(valid, x, 0.0)) / jnp.maximum(count, 1)


def info_nce(za, zb, valid_a, valid_b, weight_ab, weight_ba, temperature, same_modality=False):
  """Symmetric InfoNCE between two modalities over the (global) batch.

  Product b is a query only where both sides are present, and a candidate only where its side is
  present. Each direction's per-product loss is multiplied by that product's weight.
  same_modality=True is SimCLR's NT-Xent (the released code): the query's own modality, other
  products, joins the negatives.
  """
  logits = jnp.einsum('id,jd->ij', za, zb) / temperature
  both = valid_a & valid_b
  a_to_b = jnp.where(valid_b[None, :], logits, NEG)
  b_to_a = jnp.where(valid_a[None, :], logits.T, NEG)
  if same_modality:
    off_diagonal = ~jnp.eye(len(za), dtype=bool)
    a_to_a = jnp.einsum('id,jd->ij', za, za) / temperature
    b_to_b = jnp.einsum('id,jd->ij', zb, zb) / temperature
    a_to_b = jnp.concatenate([a_to_b, jnp.where(off_diagonal & valid_a[None, :], a_to_a, NEG)], 1)
    b_to_a = jnp.concatenate([b_to_a, jnp.where(off_diagonal & valid_b[None, :], b_to_b, NEG)], 1)
  n = len(za)
  a_to_b = -jnp.diagonal(jax.nn.log_softmax(a_to_b, axis=1)[:, :n])
  b_to_a = -jnp.diagonal(jax.nn.log_softmax(b_to_a, axis=1)[:, :n])
  a_to_b = jnp.where(both, a_to_b, 0.0) * weight_ab
  b_to_a = jnp.where(both, b_to_a, 0.0) * weight_ba
  return 0.5 * (_mean_over(a_to_b, both) + _mean_over(b_to_a, both))


def token_loss(logits, targets, masked, weight, count=None):
  """Cross-entropy at masked positions, averaged per product, weighted per product [B]."""
  ce = -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], axis=-1)[..., 0]
  return _per_product(ce, masked, weight, count)


def regression_loss(predictions, targets, masked, weight, count=None):
  """MSE against each masked patch normalised to zero mean, unit variance (MAE's target)."""
  mean = targets.mean(-1, keepdims=True)
  std = jnp.sqrt(targets.var(-1, keepdims=True) + 1e-6)
  se = jnp.mean(jnp.square(predictions - (targets - mean) / std), axis=-1)
  return _per_product(se, masked, weight, count)


def _per_product(per_position, masked, weight, products=None):
  count = masked.sum(-1)
  per_product = jnp.where(masked, per_position, 0.0).sum(-1) / jnp.maximum(count, 1)
  return _mean_over(per_product * weight, count > 0, products)


def masked_product_counts(batch, config) -> dict:
  """Per masked objective, the number of products it averages over (modality present, at least
  one position masked). Gradient accumulation passes the whole batch's counts to
  scale_objective, so that each microbatch's masked losses add up to the whole batch's."""
  present, names = batch['present'], modalities.active(config)
  return {modalities.get(k).objective: jnp.sum(jnp.any(batch[f'{k}_masked'] & present[:, i, None],
                                                       -1))
          for i, k in enumerate(names) if f'{k}_masked' in batch}


def weight_matrix(outputs, present, config):
  """The weights G [B, M, M] that multiply per-product losses: off-diagonal (contrastive pairs)
  from the pre-fusion vectors z, diagonal (masked objectives) from the fused ones."""
  m = config.model
  stop = jax.lax.stop_gradient if m.stop_gradient_weights else (lambda x: x)
  learned = outputs.get('log_variances')  # a parameter, trained whatever stop_gradient says
  pair_w = harmonized_weights(stop(outputs['z']), present, m.weighting, learned)
  self_w = harmonized_weights(stop(outputs['fused']), present, m.weighting, learned)
  return jnp.where(jnp.eye(pair_w.shape[-1], dtype=bool), self_w, pair_w)


def weight_sums(outputs, present, config):
  """([M, M] the sum of G over the products that have both modalities of each entry, [M, M]
  how many products those are)."""
  g = weight_matrix(outputs, present, config)
  both = present[:, :, None] & present[:, None, :]
  return jnp.sum(jnp.where(both, g, 0.0), 0), jnp.sum(both, 0)


def weight_means(outputs, present, config) -> dict:
  """'weights/a-b': the batch mean of the harmonized weight G[a, b] over products that have both
  modalities (the diagonal 'weights/a-a' weighs a's masked objective)."""
  total, count = weight_sums(outputs, present, config)
  mean = total / jnp.maximum(count, 1)
  names = modalities.active(config)
  return {f'weights/{a}-{b}': mean[i, j] for i, a in enumerate(names) for j, b in enumerate(names)}


def scale_objective(outputs, batch, config, masked_counts=None):
  """Total loss and a dict of each term (unweighted by coefficients) for logging.

  masked_counts: per masked objective, the number of products to divide by instead of this
  batch's own count (see masked_product_counts).
  """
  present, coef, m = batch['present'], config.loss, config.model
  names = modalities.active(config)
  if m.contrastive not in ('infonce', 'nt_xent'):
    raise ValueError(f"model.contrastive must be 'infonce' or 'nt_xent', not {m.contrastive!r}")
  weights = weight_matrix(outputs, present, config)  # [B, M, M]
  self_w = jnp.diagonal(weights, axis1=1, axis2=2)
  terms = {}
  z, t = outputs['z'], outputs['temperature']
  for i, j in itertools.combinations(range(len(names)), 2):
    terms[f'contrastive/{names[i]}-{names[j]}'] = info_nce(
        z[:, i], z[:, j], present[:, i], present[:, j], weights[:, i, j], weights[:, j, i], t,
        same_modality=m.contrastive == 'nt_xent')
  contrastive = sum(terms.values())
  total = coef.contrastive * contrastive
  terms['contrastive'] = contrastive
  for k, pred in outputs['predictions'].items():
    i, spec = names.index(k), modalities.get(k)
    masked = batch[f'{k}_masked'] & present[:, i, None]
    count = None if masked_counts is None else masked_counts[spec.objective]
    if spec.discrete:
      targets, decoded = batch[f'{k}_target'], outputs.get('decoded', {}).get(k)
      if decoded is not None:  # predictions at these positions only (config.<k>.max_masked)
        masked = jnp.take_along_axis(masked, decoded, axis=1)
        targets = jnp.take_along_axis(targets, decoded, axis=1)
      loss = token_loss(pred, targets, masked, self_w[:, i], count)
    else:
      loss = regression_loss(pred, batch[f'{k}_input'], masked, self_w[:, i], count)
    terms[spec.objective] = loss
    total += coef[spec.objective] * loss
  if 'log_variances' in outputs:  # a parameter: the same in every microbatch (train.py)
    terms['weight_regularizer'] = learned_weight_regularizer(outputs['log_variances'], config)
    total += terms['weight_regularizer']
  terms['loss'] = total
  return total, terms
