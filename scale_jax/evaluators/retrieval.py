"""Retrieval metrics: blockwise top-k search and the authors' mAP@k / Prec@k.

Features are L2-normalised by the caller, so the dot product is the cosine similarity. Nothing
here holds a full queries x gallery matrix: top_k works through blocks of query rows.
"""
import math

import numpy as np
from absl import logging
from etils import epath

from scale_jax.data import pipeline, raw
from scale_jax.evaluators import base

KS = (1, 5, 10)


def top_k(queries, gallery, k, exclude=None, max_elements=1 << 24, groups=None):
  """The k most similar gallery rows of each query, by dot product.

  Args:
    queries: float [Q, D].
    gallery: float [N, D].
    k: how many results per query.
    exclude: optional int [Q]: a gallery index to leave out of each query's results (the query
      itself when queries and gallery are the same set); -1 leaves nothing out for that query.
    max_elements: the most similarities held at once (the working memory is a few times that:
      the partition's copy, masks); queries go through in blocks of max(1, max_elements // N).
    groups: optional (query groups int [Q], gallery groups int [N]): gallery rows in the
      query's own group are left out too (the other listings of the query's physical product).
      A query left with fewer than k candidates gets score -inf in the places it cannot fill.

  Returns:
    (indices int64 [Q, k_eff], scores float32 [Q, k_eff]), each row by score descending, ties
    broken by the lower gallery index. k_eff = min(k, N), or min(k, N - 1) when exclude leaves
    something out for any query, so no returned entry is an excluded one.
  """
  queries = np.asarray(queries, np.float32)
  gallery = np.asarray(gallery, np.float32)
  if not (np.isfinite(queries).all() and np.isfinite(gallery).all()):
    raise ValueError('top_k: features must be finite')  # NaN would upset the partition
  q, n = len(queries), len(gallery)
  excluding = exclude is not None and bool(np.any(np.asarray(exclude) >= 0))
  k_eff = max(0, min(int(k), n - 1 if excluding else n))
  indices = np.zeros((q, k_eff), np.int64)
  scores = np.zeros((q, k_eff), np.float32)
  if q == 0 or k_eff == 0:
    return indices, scores
  if excluding:
    exclude = np.asarray(exclude, np.int64).reshape(q)
  rows = max(1, int(max_elements) // n)
  for start in range(0, q, rows):
    stop = min(start + rows, q)
    sims = queries[start:stop] @ gallery.T  # [B, N]
    if excluding:
      r = np.flatnonzero(exclude[start:stop] >= 0)
      sims[r, exclude[start:stop][r]] = -np.inf
    if groups is not None:
      sims[groups[0][start:stop, None] == groups[1][None, :]] = -np.inf
    indices[start:stop], scores[start:stop] = _block_top_k(sims, k_eff)
  return indices, scores


def _block_top_k(sims, k):
  """top_k of one block [B, N] of similarities, 1 <= k <= N, in O(B N) rather than a full sort.

  argpartition alone picks arbitrarily among scores tied with the k-th largest; taking every
  score above it plus the lowest-index ties makes the result deterministic.
  """
  b, n = sims.shape
  kth = np.partition(sims, n - k, axis=1)[:, n - k:n - k + 1]  # k-th largest, [B, 1]
  chosen = sims >= kth
  extra = chosen.sum(1) - k  # > 0 where ties with the k-th score overflow the k places
  rows = np.flatnonzero(extra > 0)
  if len(rows):  # rare with real features: drop the highest-index ties of those rows only
    ties = sims[rows] == kth[rows]
    from_right = np.cumsum(ties[:, ::-1], axis=1, dtype=np.int32)[:, ::-1]
    chosen[rows] &= ~(ties & (from_right <= extra[rows, None]))
  idx = np.nonzero(chosen)[1].reshape(b, k)  # exactly k per row, in ascending index order
  val = np.take_along_axis(sims, idx, axis=1)
  order = np.argsort(-val, axis=1, kind='stable')  # stable: equal scores keep the lower index
  return np.take_along_axis(idx, order, axis=1), np.take_along_axis(val, order, axis=1)


def retrieval_metrics(relevant, num_relevant, ks=KS) -> dict:
  """mAP@k and Prec@k over the queries that can be answered.

  Args:
    relevant: bool [Q, K]: whether each query's i-th result is relevant. Results past K (a gallery
      smaller than k) count as not relevant.
    num_relevant: int [Q]: relevant items in the gallery for each query, the query itself not
      counted. Queries with none cannot be answered and are left out of every mean.
    ks: the cut-offs.

  Per query, with hits@k the relevant results among the top k:
    AP@k = (1 / hits@k) * sum_{i <= k, rel_i} Prec@i, 0 when hits@k = 0 (the authors'
    normalisation: by the hits within the top k, not by num_relevant, so AP@1 = Prec@1);
    Prec@k = hits@k / k.

  Returns:
    {'mAP@k': ..., 'Prec@k': ... for each k in ks, in [0, 1]; 'queries': the number of queries
    counted}. With no query counted (say, fine-grained retrieval on a catalogue without an
    instance shared by two products) every metric is NaN: undefined, not 0.
  """
  relevant = np.asarray(relevant, bool)
  num_relevant = np.asarray(num_relevant).reshape(-1)
  if relevant.ndim != 2 or len(relevant) != len(num_relevant):
    raise ValueError(f'relevant must be [Q, K] and num_relevant [Q], not {relevant.shape} and '
                     f'{num_relevant.shape}')
  relevant = relevant[num_relevant > 0]
  count = len(relevant)
  depth = relevant.shape[1]
  hits_at = np.cumsum(relevant, axis=1)  # hits@i, [Q, K]
  precision_at = hits_at / np.arange(1, depth + 1)
  gain = np.cumsum(np.where(relevant, precision_at, 0.0), axis=1)  # sum_{j <= i, rel_j} Prec@j
  maps, precisions = {}, {}
  for k in ks:
    d = min(k, depth)
    hits = hits_at[:, d - 1] if d else np.zeros(count)
    total = gain[:, d - 1] if d else np.zeros(count)
    ap = np.where(hits > 0, total / np.maximum(hits, 1), 0.0)
    maps[f'mAP@{k}'] = float(ap.mean()) if count else math.nan
    precisions[f'Prec@{k}'] = float((hits / k).mean()) if count else math.nan
  out = {**maps, **precisions}
  out['queries'] = count
  return out


def retrieve(features, keys, ks=KS, query_index=None, gallery_index=None,
             max_elements=1 << 24, groups=None) -> dict:
  """retrieval_metrics of same-key retrieval among rows of one feature matrix.

  Args:
    features: float [N, D], L2-normalised.
    keys: [N]: what makes a result relevant: category labels for coarse-grained retrieval,
      instance ids for fine-grained. Any values np.unique can sort.
    ks: the cut-offs.
    query_index: int [Q] rows used as queries (default: all).
    gallery_index: int [G] distinct rows searched (default: all). A query in the gallery is left
      out of its own results and of its num_relevant.
    max_elements: as top_k.
    groups: optional [N] (instance ids): gallery rows in the query's own group are left out of
      its results and of its num_relevant (category retrieval across physical products, not
      among the listings of the query's own product).

  num_relevant comes from the keys of the whole gallery, not from the top k: a query whose key
  no other gallery row shares (an instance with a single member) is not counted.
  """
  features = np.asarray(features)
  n = len(features)
  _, dense = np.unique(np.asarray(keys), return_inverse=True)
  dense = dense.reshape(-1)
  queries = np.arange(n) if query_index is None else np.asarray(query_index, np.int64)
  gallery = np.arange(n) if gallery_index is None else np.asarray(gallery_index, np.int64)
  position = np.full(n, -1, np.int64)  # each row's place in the gallery, -1 when not in it
  position[gallery] = np.arange(len(gallery))
  exclude = position[queries]
  group_pair = None
  if groups is not None:
    _, group = np.unique(np.asarray(groups), return_inverse=True)
    group = group.reshape(-1)
    group_pair = (group[queries], group[gallery])
  idx, scores = top_k(features[queries], features[gallery], max(ks), exclude, max_elements,
                      group_pair)
  relevant = (dense[gallery][idx] == dense[queries][:, None]) & np.isfinite(scores)
  per_key = np.bincount(dense[gallery], minlength=int(dense.max(initial=-1)) + 1)
  num_relevant = per_key[dense[queries]] - (exclude >= 0)
  if groups is not None:  # the query's own group (itself included) shares its key: not counted
    per_group = np.bincount(group[gallery], minlength=int(group.max(initial=-1)) + 1)
    num_relevant = per_key[dense[queries]] - per_group[group[queries]]
  return retrieval_metrics(relevant, num_relevant, ks)


def _read_ids(field: str, path: str) -> set:
  """The item ids of a list file (one per line; blank lines and a UTF-8 byte order mark
  ignored), each read as the build reads a manifest's (raw.id_text: NFC, whitespace collapsed,
  HTML references), so a listed id names the product whichever way it was typed. Read when the
  evaluator is built: a wrong path fails before any feature is computed or any step trained."""
  try:
    text = epath.Path(path).read_bytes().decode('utf-8-sig')
  except (OSError, UnicodeDecodeError) as e:
    raise ValueError(f'{field}={path!r}: cannot read it as a UTF-8 list of item ids ({e})') from e
  ids = {raw.id_text(line) for line in text.splitlines()} - {None}
  if not ids:
    raise ValueError(f'{field}={path!r}: the file lists no item id (one per line)')
  return ids


class Evaluator(base.Evaluator):
  """Coarse-grained (relevance='category') or fine-grained (relevance='instance') retrieval: each
  product of the evaluated split a query against the others, for every combination.
  `queries`, `gallery`: optional files of item ids, one per line (M5Product ships such lists),
  restricting who asks and who may be found. `other_instances=True` (category relevance only)
  leaves the other listings of the query's physical product out of its gallery: a catalogue with
  near-duplicate listings otherwise rewards matching the duplicate (the same brand word) more
  than knowing the category."""

  def __init__(self, name, config, relevance='category', ks=(1, 5, 10), queries='', gallery='',
               every=0, combinations=None, other_instances=False):
    super().__init__(name, config, every, combinations)
    if relevance not in ('category', 'instance'):
      raise ValueError(f"config.evals.{name}.relevance={relevance!r}: 'category' (coarse) or "
                       f"'instance' (fine-grained)")
    if other_instances and relevance != 'category':
      raise ValueError(f'config.evals.{name}.other_instances=True needs relevance=\'category\' '
                       f'(same-instance results are what fine-grained retrieval looks for)')
    self.config, self.relevance, self.ks = config, relevance, tuple(ks)
    self.other_instances = bool(other_instances)
    self.id_lists = {which: _read_ids(f'config.evals.{name}.{which}', path)
                     for which, path in (('queries', queries), ('gallery', gallery)) if path}
    self._warned = set()

  def describe(self):
    grain = 'coarse' if self.relevance == 'category' else 'fine'
    return (f'{grain}-grained retrieval, relevant = same {self.relevance}; mAP@k and Prec@k over '
            f'the top {max(self.ks)}, the query'
            + (' and the other listings of its physical product' if self.other_instances else '')
            + ' excluded; queries without a relevant product left out')

  def _listed(self, f) -> dict:
    """{'queries'/'gallery': bool [rows of f], whether the product is listed}, for the lists
    given; warns (once per split) about listed ids the split does not have."""
    if not self.id_lists:
      return {}
    ids = np.asarray(pipeline.item_ids(self.config, f.split, f.rows))
    out = {}
    for which, listed in self.id_lists.items():
      out[which] = np.isin(ids, list(listed))
      absent = len(listed) - len(set(ids[out[which]]))
      if absent and (f.split, which) not in self._warned:
        self._warned.add((f.split, which))
        logging.warning('config.evals.%s.%s: %d of its %d item ids are not in the %s split%s',
                        self.name, which, absent, len(listed), f.split,
                        '; nothing is left to evaluate' if absent == len(listed) else '')
    return out

  def __call__(self, context):
    f = context.features()
    keys = f.labels if self.relevance == 'category' else f.instances
    listed = self._listed(f)
    out = {}
    for combo in self.combination_names():
      chosen = np.flatnonzero(f.has[combo])
      lists = {which: np.flatnonzero(listed[which][chosen]) if which in listed else None
               for which in ('queries', 'gallery')}
      out[combo] = retrieve(f.features[combo][chosen], keys[chosen], self.ks,
                            query_index=lists['queries'], gallery_index=lists['gallery'],
                            groups=f.instances[chosen] if self.other_instances else None)
    return out
