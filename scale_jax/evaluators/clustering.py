"""Clustering of product features: k-means, and the NMI and purity of a clustering."""
import math

import numpy as np
from absl import logging

from scale_jax.evaluators import base

# Most point-to-centre distances held at once in k-means (a block of rows x k).
_MAX_ELEMENTS = 1 << 22


def _sq_distances(x, x_sq, centres):
  """Squared distances [N, C] of rows of x to centres, >= 0 (the expansion can dip below)."""
  d = x_sq[:, None] - 2.0 * (x @ centres.T) + np.sum(centres * centres, axis=1)[None]
  return np.maximum(d, 0.0)


def _assign(x, x_sq, centres):
  """(nearest centre [N], squared distance to it [N]), blockwise over rows of x."""
  n = len(x)
  labels = np.empty(n, np.int64)
  dist = np.empty(n, x.dtype)
  rows = max(1, _MAX_ELEMENTS // len(centres))
  for start in range(0, n, rows):
    d = _sq_distances(x[start:start + rows], x_sq[start:start + rows], centres)
    labels[start:start + rows] = np.argmin(d, axis=1)
    dist[start:start + rows] = np.take_along_axis(d, labels[start:start + rows, None], 1)[:, 0]
  return labels, dist


def _kmeans_plus_plus(x, x_sq, k, rng):
  """k initial centres, greedy k-means++ (each step keeps the best of a few D^2 samples, as
  sklearn does: plain k-means++ often seeds two centres in one cluster)."""
  n = len(x)
  trials = 2 + int(np.log(k))
  centres = np.empty((k, x.shape[1]), x.dtype)
  centres[0] = x[rng.integers(n)]
  closest = _sq_distances(x, x_sq, centres[:1])[:, 0]
  for c in range(1, k):
    cdf = np.cumsum(closest, dtype=np.float64)  # float32 sums drift over many points
    total = cdf[-1]
    if total > 0:
      candidates = np.minimum(np.searchsorted(cdf, rng.random(trials) * total, side='right'),
                              n - 1)
    else:  # every point sits on a centre already (fewer distinct points than k)
      candidates = rng.integers(n, size=trials)
    d = np.minimum(closest[None], _sq_distances(x, x_sq, x[candidates]).T)  # [trials, N]
    best = int(np.argmin(d.sum(1)))
    centres[c], closest = x[candidates[best]], d[best]
  return centres


def _lloyd(x, x_sq, centres, iters):
  """Lloyd iterations from centres until the assignments stop changing: (labels, inertia)."""
  k = len(centres)
  labels, dist = _assign(x, x_sq, centres)
  for _ in range(iters):
    counts = np.bincount(labels, minlength=k)
    order = np.argsort(labels, kind='stable')
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    filled = counts > 0
    sums = np.add.reduceat(x[order], starts[filled], axis=0)
    centres = centres.copy()
    centres[filled] = sums / counts[filled, None]
    empty = np.flatnonzero(~filled)
    if len(empty):  # restart each empty cluster on one of the points farthest from its centre
      centres[empty] = x[np.argsort(-dist, kind='stable')[:len(empty)]]
    new_labels, dist = _assign(x, x_sq, centres)
    if np.array_equal(new_labels, labels):
      break
    labels = new_labels
  return labels, float(dist.sum())


def kmeans(x, k, seed=0, iters=100, restarts=3):
  """Cluster labels int64 [N] of the rows of x [N, D] by k-means.

  k-means++ initialisation then Lloyd iterations until the assignments stop changing or after
  iters; the best of `restarts` runs by inertia (sum of squared distances to the centres).
  Deterministic for a seed. k is capped at N; labels lie in [0, k).
  """
  x = np.asarray(x)
  x = x if x.dtype in (np.float32, np.float64) else x.astype(np.float64)
  if x.ndim != 2:
    raise ValueError(f'kmeans: x must be [N, D], not {x.shape}')
  n = len(x)
  if k < 1:
    raise ValueError(f'kmeans: k must be >= 1, not {k}')
  k = min(int(k), n)
  if k == 0:
    return np.zeros(0, np.int64)
  x_sq = np.sum(x * x, axis=1)
  rng = np.random.default_rng(seed)
  best, best_inertia = None, np.inf
  for _ in range(max(1, restarts)):
    labels, inertia = _lloyd(x, x_sq, _kmeans_plus_plus(x, x_sq, k, rng), iters)
    if inertia < best_inertia:
      best, best_inertia = labels, inertia
  return best


def _contingency(true, pred):
  """Nonzero cells of the contingency table, without the dense table (which for fine-grained
  ids would be classes x clusters): (class [M], cluster [M], count [M], class sizes, cluster
  sizes), cells sorted by cluster."""
  true, pred = np.asarray(true).reshape(-1), np.asarray(pred).reshape(-1)
  if len(true) != len(pred):
    raise ValueError(f'true and pred differ in length: {len(true)} and {len(pred)}')
  _, t = np.unique(true, return_inverse=True)
  _, p = np.unique(pred, return_inverse=True)
  classes = int(t.max(initial=-1)) + 1
  cells, counts = np.unique(p.astype(np.int64) * classes + t, return_counts=True)
  return (cells % classes, cells // classes, counts, np.bincount(t.reshape(-1)),
          np.bincount(p.reshape(-1)))


def _entropy(sizes):
  p = sizes[sizes > 0].astype(np.float64)
  return float(-np.sum(p / p.sum() * (np.log(p) - np.log(p.sum()))))


def nmi(true, pred) -> float:
  """Normalised mutual information of two partitions, MI / mean(H(true), H(pred)).

  As sklearn.metrics.normalized_mutual_info_score (arithmetic mean, natural log): 1.0 when both
  partitions have a single cluster (or no items), 0.0 when the MI is 0 otherwise (including a
  single cluster on one side only). Identical partitions (up to relabelling) give exactly 1.0.
  """
  t, p, counts, t_sizes, p_sizes = _contingency(true, pred)
  if len(t_sizes) == len(p_sizes) and len(t_sizes) <= 1:
    return 1.0
  if len(t_sizes) == 1 or len(p_sizes) == 1:
    return 0.0
  if len(counts) == len(t_sizes) == len(p_sizes):  # one cell per class and cluster: identical
    return 1.0  # (exactly: the float ratio below can land a bit either side of 1)
  n = counts.sum()
  # MI = sum_ij (n_ij / n) log(n n_ij / (a_i b_j)), over nonzero cells only.
  outer = t_sizes[t].astype(np.float64) * p_sizes[p]
  terms = counts / n * (np.log(counts) + np.log(n) - np.log(outer))
  terms = np.where(np.abs(terms) < np.finfo(terms.dtype).eps, 0.0, terms)  # as sklearn
  mi = max(float(terms.sum()), 0.0)
  if mi == 0.0:
    return 0.0
  return min(mi / (0.5 * (_entropy(t_sizes) + _entropy(p_sizes))), 1.0)


def purity(true, pred) -> float:
  """Fraction of items in their cluster's majority class: sum over clusters of the largest class
  count in it, / N. 1.0 for no items."""
  _, p, counts, _, p_sizes = _contingency(true, pred)
  if len(counts) == 0:
    return 1.0
  starts = np.flatnonzero(np.r_[True, p[1:] != p[:-1]])  # cells are grouped by cluster
  return float(np.maximum.reduceat(counts, starts).sum() / p_sizes.sum())


class Evaluator(base.Evaluator):
  """k-means on the evaluated split's product features, k = the number of categories among
  them; NMI and purity against the categories, for every combination."""

  def __init__(self, name, config, restarts=3, iters=100, every=0, combinations=None):
    super().__init__(name, config, every, combinations)
    self.seed, self.restarts, self.iters = config.seed, restarts, iters

  def describe(self):
    return 'k-means clustering, k = the number of categories; NMI and purity'

  def __call__(self, context):
    f = context.features()
    out = {}
    for combo in self.combination_names():
      chosen = f.has[combo]
      if not chosen.any():  # no product of the split has the combination: undefined, not 1 or 0
        out[combo] = {'NMI': math.nan, 'purity': math.nan, 'products': 0}
        continue
      labels = f.labels[chosen]
      k = len(np.unique(labels))
      if k > chosen.sum() / 2:  # about a product per cluster: NMI and purity near 1 regardless
        logging.warning('%s, %s: k-means with k = %d categories for %d products: NMI and purity '
                        'are high for any features; a catalogue with more products per category '
                        'tells models apart', self.name, combo, k, chosen.sum())
      pred = kmeans(f.features[combo][chosen], k, self.seed, self.iters, self.restarts)
      out[combo] = {'NMI': nmi(labels, pred), 'purity': purity(labels, pred),
                    'products': int(chosen.sum())}
    return out
