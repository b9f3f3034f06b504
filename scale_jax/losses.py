"""The SCALE objective: self-harmonized weights, contrastive terms over all modality pairs, and the
five masked objectives (../shared/spec/scale-method.md, sections Self-harmonized weighting and
Objectives). Weights multiply per-product losses, not logits."""
import itertools

import jax
import jax.numpy as jnp

from scale_jax import MODALITIES

# The masked objective of each modality, named as in the paper.
MASKED_OBJECTIVES = {'text': 'mlm', 'table': 'mem', 'image': 'mrm', 'video': 'mfp', 'audio': 'mam'}
PAIRS = tuple(itertools.combinations(range(len(MODALITIES)), 2))
# Stands in for -inf in masked logits: -inf makes fully masked rows NaN, and NaN gradients survive
# a later jnp.where.
NEG = -1e9


def l2_normalize(x, axis=-1):
  """x / |x|, with a finite gradient at x = 0 (absent modalities give zero rows)."""
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=axis, keepdims=True), 1e-12))


def harmonized_weights(v, present, mode='harmonized'):
  """Per-product weight matrices G [B, M, M] from modality vectors v [B, M, D].

  The spec's R = C * softmax(C) over present modalities, rows L2-normalised, with one change: C
  is the cosine similarity rescaled to [0, 1], (1 + cos) / 2. With raw cosines a pair pointing
  apart gets a negative weight, which turns its loss into one to maximise. Rows and columns of
  absent modalities are zero. 'uniform' gives every present pair the same weight (the ablation),
  normalised the same way.
  """
  pair_present = present[:, :, None] & present[:, None, :]
  if mode == 'harmonized':
    v = l2_normalize(v)
    c = 0.5 * (1.0 + jnp.einsum('bid,bjd->bij', v, v))
    r = c * jax.nn.softmax(jnp.where(pair_present, c, NEG), axis=-1)
  elif mode == 'uniform':
    r = jnp.ones(pair_present.shape, v.dtype)
  else:
    raise ValueError(f"weighting must be 'harmonized' or 'uniform', not {mode!r}")
  return l2_normalize(jnp.where(pair_present, r, 0.0))


def _mean_over(x, valid):
  return jnp.sum(jnp.where(valid, x, 0.0)) / jnp.maximum(jnp.sum(valid), 1)


def info_nce(za, zb, valid_a, valid_b, weight_ab, weight_ba, temperature):
  """Symmetric InfoNCE between two modalities over the (global) batch.

  Product b is a query only where both sides are present, and a candidate only where its side is
  present. Each direction's per-product loss is multiplied by that product's weight.
  """
  logits = jnp.einsum('id,jd->ij', za, zb) / temperature
  both = valid_a & valid_b
  a_to_b = -jax.nn.log_softmax(jnp.where(valid_b[None, :], logits, NEG), axis=1)
  b_to_a = -jax.nn.log_softmax(jnp.where(valid_a[:, None], logits, NEG), axis=0)
  a_to_b = jnp.where(both, jnp.diagonal(a_to_b), 0.0) * weight_ab
  b_to_a = jnp.where(both, jnp.diagonal(b_to_a), 0.0) * weight_ba
  return 0.5 * (_mean_over(a_to_b, both) + _mean_over(b_to_a, both))


def token_loss(logits, targets, masked, weight):
  """Cross-entropy at masked positions, averaged per product, weighted per product [B]."""
  ce = -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], axis=-1)[..., 0]
  return _per_product(ce, masked, weight)


def regression_loss(predictions, targets, masked, weight):
  """MSE against each masked patch normalised to zero mean, unit variance (MAE's target)."""
  mean = targets.mean(-1, keepdims=True)
  std = jnp.sqrt(targets.var(-1, keepdims=True) + 1e-6)
  se = jnp.mean(jnp.square(predictions - (targets - mean) / std), axis=-1)
  return _per_product(se, masked, weight)


def _per_product(per_position, masked, weight):
  count = masked.sum(-1)
  per_product = jnp.where(masked, per_position, 0.0).sum(-1) / jnp.maximum(count, 1)
  return _mean_over(per_product * weight, count > 0)


def scale_objective(outputs, batch, config):
  """Total loss and a dict of each term (unweighted by coefficients) for logging."""
  present, coef, m = batch['present'], config.loss, config.model
  stop = jax.lax.stop_gradient if m.stop_gradient_weights else (lambda x: x)
  # Off-diagonal weights from the pre-fusion vectors, diagonal weights from the fused ones.
  pair_w = stop(harmonized_weights(outputs['z'], present, m.weighting))
  self_w = stop(jnp.diagonal(harmonized_weights(outputs['fused'], present, m.weighting),
                             axis1=1, axis2=2))
  terms = {}
  z, t = outputs['z'], outputs['temperature']
  for i, j in PAIRS:
    terms[f'contrastive/{MODALITIES[i]}-{MODALITIES[j]}'] = info_nce(
        z[:, i], z[:, j], present[:, i], present[:, j], pair_w[:, i, j], pair_w[:, j, i], t)
  contrastive = sum(terms.values())
  total = coef.contrastive * contrastive
  terms['contrastive'] = contrastive
  for i, k in enumerate(MODALITIES):
    pred, masked = outputs['predictions'][k], batch[f'{k}_masked'] & present[:, i, None]
    if f'{k}_target' in batch:
      loss = token_loss(pred, batch[f'{k}_target'], masked, self_w[:, i])
    else:
      loss = regression_loss(pred, batch[f'{k}_input'], masked, self_w[:, i])
    terms[MASKED_OBJECTIVES[k]] = loss
    total += coef[MASKED_OBJECTIVES[k]] * loss
  terms['loss'] = total
  return total, terms
