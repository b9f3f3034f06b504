"""Retrieval, clustering and classification metrics: hand-computed cases, brute force and sklearn
as references."""
import numpy as np
import pytest
from sklearn.metrics import normalized_mutual_info_score
from sklearn.metrics.cluster import contingency_matrix

from scale_jax.evaluators import classification, clustering, retrieval


def _row(*hits, k=10):
  r = np.zeros(k, bool)
  r[list(hits)] = True
  return r


# --- retrieval_metrics ---------------------------------------------------------------------------

def test_ap_and_precision_hand_computed():
  # Relevant at ranks 1 and 3 of 10, 2 relevant in the gallery.
  m = retrieval.retrieval_metrics(_row(0, 2)[None], [2])
  assert m['mAP@1'] == pytest.approx(1.0) and m['Prec@1'] == pytest.approx(1.0)
  assert m['mAP@5'] == pytest.approx(0.5 * (1 + 2 / 3))
  assert m['mAP@10'] == pytest.approx(0.5 * (1 + 2 / 3))
  assert m['Prec@5'] == pytest.approx(2 / 5) and m['Prec@10'] == pytest.approx(2 / 10)
  assert m['queries'] == 1
  # Relevant at ranks 2, 5 and 10, 5 in the gallery: AP divides by the hits in the top k.
  m = retrieval.retrieval_metrics(_row(1, 4, 9)[None], [5])
  assert m['mAP@1'] == 0.0 and m['Prec@1'] == 0.0
  assert m['mAP@5'] == pytest.approx(0.5 * (1 / 2 + 2 / 5))
  assert m['mAP@10'] == pytest.approx((1 / 3) * (1 / 2 + 2 / 5 + 3 / 10))
  assert m['Prec@5'] == pytest.approx(2 / 5) and m['Prec@10'] == pytest.approx(3 / 10)


def test_means_skip_unanswerable_queries_and_count_empty_top_k_as_zero():
  relevant = np.stack([_row(0, 2), _row(1, 4, 9), _row(), _row()])
  # Query 2 has 3 relevant items but none in its top 10 (scores 0); query 3 has none at all.
  m = retrieval.retrieval_metrics(relevant, [2, 5, 3, 0])
  assert m['queries'] == 3
  assert m['mAP@1'] == pytest.approx((1 + 0 + 0) / 3)
  assert m['mAP@5'] == pytest.approx((0.5 * (1 + 2 / 3) + 0.5 * (1 / 2 + 2 / 5) + 0) / 3)
  assert m['mAP@10'] == pytest.approx(
      (0.5 * (1 + 2 / 3) + (1 / 3) * (1 / 2 + 2 / 5 + 3 / 10) + 0) / 3)
  assert m['Prec@10'] == pytest.approx((2 / 10 + 3 / 10 + 0) / 3)
  assert list(m) == ['mAP@1', 'mAP@5', 'mAP@10', 'Prec@1', 'Prec@5', 'Prec@10', 'queries']
  none = retrieval.retrieval_metrics(np.zeros((2, 10), bool), [0, 0])
  assert none['queries'] == 0 and np.isnan(none['mAP@10']) and np.isnan(none['Prec@1'])


def test_map_at_1_is_precision_at_1_and_short_result_lists():
  rng = np.random.default_rng(0)
  relevant = rng.random((50, 10)) < 0.3
  m = retrieval.retrieval_metrics(relevant, np.full(50, 4))
  assert m['mAP@1'] == m['Prec@1']
  assert all(0.0 <= v <= 1.0 for key, v in m.items() if key != 'queries')
  # A gallery of 3: ranks past 3 are not relevant, Prec@k still divides by k.
  m = retrieval.retrieval_metrics(np.array([[True, False, True]]), [2])
  assert m['mAP@10'] == pytest.approx(0.5 * (1 + 2 / 3)) and m['Prec@10'] == pytest.approx(0.2)


# --- top_k ---------------------------------------------------------------------------------------

def _brute_top_k(queries, gallery, k, exclude=None):
  sims = queries.astype(np.float64) @ gallery.T.astype(np.float64)
  idx, val = [], []
  for i, s in enumerate(sims):
    order = np.lexsort((np.arange(len(s)), -s))  # score descending, then lower index
    if exclude is not None:
      order = order[order != exclude[i]]
    idx.append(order[:k])
    val.append(s[order[:k]])
  return np.array(idx), np.array(val)


@pytest.mark.parametrize('max_elements', [1, 37, 1 << 24])
def test_top_k_matches_full_sort_with_ties_and_exclude(max_elements):
  rng = np.random.default_rng(1)
  # Small integers: every dot product exact, so ties are exact whatever the summation order.
  gallery = rng.integers(-2, 3, size=(40, 6)).astype(np.float32)
  gallery[20:30] = gallery[:10]  # duplicated rows: tied scores
  queries = gallery[:13]
  exclude = np.arange(13)
  exclude[[3, 7]] = -1  # these two queries keep themselves
  for k in (1, 5, 10):
    idx, val = retrieval.top_k(queries, gallery, k, exclude, max_elements=max_elements)
    want_idx, want_val = _brute_top_k(queries, gallery, k, exclude)
    assert idx.shape == (13, k) and idx.dtype == np.int64 and val.dtype == np.float32
    np.testing.assert_array_equal(idx, want_idx)
    np.testing.assert_array_equal(val, want_val)
  idx, val = retrieval.top_k(queries, gallery, 5, max_elements=max_elements)
  np.testing.assert_array_equal(idx, _brute_top_k(queries, gallery, 5)[0])


def test_top_k_random_features_and_small_gallery():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(60, 16)).astype(np.float32)
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  idx, val = retrieval.top_k(x, x, 10, np.arange(60), max_elements=100)
  want_idx, want_val = _brute_top_k(x, x, 10, np.arange(60))
  np.testing.assert_array_equal(idx, want_idx)
  np.testing.assert_allclose(val, want_val, rtol=1e-5, atol=1e-6)
  # Fewer candidates than k: all of them, one less when excluding.
  assert retrieval.top_k(x[:2], x[:4], 10)[0].shape == (2, 4)
  assert retrieval.top_k(x[:2], x[:4], 10, [0, 1])[0].shape == (2, 3)
  assert retrieval.top_k(x[:2], x[:4], 10, [-1, -1])[0].shape == (2, 4)
  assert retrieval.top_k(x[:0], x, 10)[0].shape == (0, 10)


# --- retrieve ------------------------------------------------------------------------------------

def _instance_features(keys, rng):
  """Rows near a one-hot of their key: same-key rows are each other's nearest neighbours."""
  dense = np.unique(keys, return_inverse=True)[1]
  x = np.eye(dense.max() + 1)[dense] + 0.05 * rng.normal(size=(len(keys), dense.max() + 1))
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_retrieve_fine_grained_leaves_out_single_member_instances():
  rng = np.random.default_rng(3)
  keys = np.array(['a', 'a', 'b', 'b', 'b', 'c', 'd', 'd', 'e', 'f'])  # c, e, f: one member
  m = retrieval.retrieve(_instance_features(keys, rng), keys)
  assert m['queries'] == 7
  assert m['mAP@1'] == m['Prec@1'] == m['mAP@10'] == pytest.approx(1.0)
  # Every relevant item is in the top 5: hits@5 = num_relevant (1 for a, d; 2 for b).
  assert m['Prec@5'] == pytest.approx((4 * 1 + 3 * 2) / 7 / 5)


def test_retrieve_query_and_gallery_subsets_match_direct_computation():
  rng = np.random.default_rng(4)
  keys = rng.integers(0, 4, size=30)
  x = rng.normal(size=(30, 8))
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  queries, gallery = np.arange(0, 12), np.arange(8, 30)  # queries 8..11 are in the gallery
  m = retrieval.retrieve(x, keys, query_index=queries, gallery_index=gallery, max_elements=50)
  exclude = np.array([int(np.flatnonzero(gallery == q)[0]) if q in gallery else -1
                      for q in queries])
  idx, _ = _brute_top_k(x[queries], x[gallery], 10, exclude)
  relevant = keys[gallery][idx] == keys[queries][:, None]
  num_relevant = [np.sum(keys[gallery] == keys[q]) - (q in gallery) for q in queries]
  want = retrieval.retrieval_metrics(relevant, num_relevant)
  assert m == pytest.approx(want)


def test_retrieve_across_instances_leaves_out_the_querys_own_product():
  rng = np.random.default_rng(5)
  n = 40
  instances = rng.integers(0, 12, size=n)
  labels = instances % 3  # an instance has one category
  x = rng.normal(size=(n, 8))
  x[:, 0] += 4 * instances  # a product's listings are each other's nearest neighbours
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  m = retrieval.retrieve(x, labels, groups=instances, max_elements=64)
  # Reference: each query searches only the products of other instances.
  relevant, num_relevant = [], []
  for q in range(n):
    others = np.flatnonzero(instances != instances[q])
    order = others[np.argsort(-(x[others] @ x[q]), kind='stable')][:10]
    relevant.append(np.pad(labels[order] == labels[q], (0, 10 - len(order))))
    num_relevant.append(np.sum(labels[others] == labels[q]))
  assert m == pytest.approx(retrieval.retrieval_metrics(np.array(relevant), num_relevant))
  # Without groups the duplicate listings answer almost every query.
  assert retrieval.retrieve(x, labels)['mAP@1'] > m['mAP@1']


# --- nmi and purity ------------------------------------------------------------------------------

def _sk_purity(true, pred):
  return contingency_matrix(true, pred).max(axis=0).sum() / len(true)


def test_nmi_and_purity_match_sklearn_on_random_partitions():
  rng = np.random.default_rng(5)
  for n, a, b in [(10, 2, 3), (100, 5, 5), (500, 20, 7), (300, 300, 10), (50, 1, 4), (50, 4, 1)]:
    true = rng.integers(0, a, size=n) * 3 - 7  # labels need not be dense or positive
    pred = rng.integers(0, b, size=n)
    assert clustering.nmi(true, pred) == pytest.approx(
        normalized_mutual_info_score(true, pred), rel=1e-10, abs=1e-12)
    assert clustering.purity(true, pred) == pytest.approx(_sk_purity(true, pred))


def test_nmi_and_purity_edge_cases():
  perfect = ([0, 0, 1, 1, 2], ['x', 'x', 'z', 'z', 'y'])  # same partition, other labels
  single = ([5, 5, 5], [1, 1, 1])
  independent = ([0, 0, 1, 1], [0, 1, 0, 1])  # MI = 0
  own = ([0, 0, 1, 1], [0, 1, 2, 3])  # every item its own cluster
  one_side = ([0, 0, 1, 1], [0, 0, 0, 0])
  for true, pred in [perfect, single, independent, own, one_side]:
    assert clustering.nmi(true, pred) == pytest.approx(normalized_mutual_info_score(true, pred))
  assert clustering.nmi(*perfect) == 1.0 and clustering.nmi(*single) == 1.0
  assert clustering.nmi(*independent) == 0.0 and clustering.nmi(*one_side) == 0.0
  assert clustering.purity(*perfect) == 1.0 and clustering.purity(*own) == 1.0
  assert clustering.purity(*one_side) == 0.5 and clustering.purity(*independent) == 0.5
  assert clustering.purity([0, 1, 1, 1], [0, 0, 0, 0]) == 0.75
  with pytest.raises(ValueError):
    clustering.nmi([0, 1], [0])


# --- kmeans --------------------------------------------------------------------------------------

def test_kmeans_recovers_separated_blobs_and_is_deterministic():
  rng = np.random.default_rng(6)
  centres = 10.0 * rng.normal(size=(5, 8))
  true = np.repeat(np.arange(5), 40)
  x = centres[true] + 0.1 * rng.normal(size=(200, 8))
  labels = clustering.kmeans(x, 5, seed=0)
  assert labels.shape == (200,) and set(labels) == set(range(5))
  assert clustering.purity(true, labels) == 1.0 and clustering.nmi(true, labels) == 1.0
  np.testing.assert_array_equal(labels, clustering.kmeans(x, 5, seed=0))
  np.testing.assert_array_equal(clustering.kmeans(x.astype(np.float32), 5, seed=1),
                                clustering.kmeans(x.astype(np.float32), 5, seed=1))


def test_kmeans_caps_k_and_survives_duplicate_points():
  x = np.array([[0.0, 0.0], [1.0, 0.0], [5.0, 5.0]])
  assert sorted(clustering.kmeans(x, 10)) == [0, 1, 2]
  dup = np.repeat(x[:2], 5, axis=0)  # two distinct points, four clusters asked
  labels = clustering.kmeans(dup, 4)
  assert labels.shape == (10,) and labels.min() >= 0 and labels.max() < 4
  assert clustering.purity(np.repeat([0, 1], 5), labels) == 1.0


# --- linear probe --------------------------------------------------------------------------------

def test_linear_probe_separates_separable_data():
  rng = np.random.default_rng(7)
  centres = 3.0 * rng.normal(size=(3, 10))

  def split(n):
    y = rng.integers(0, 3, size=n)
    return centres[y] + 0.5 * rng.normal(size=(n, 10)), y

  (train_x, train_y), (test_x, test_y) = split(300), split(150)
  acc = classification.linear_probe(train_x, train_y, test_x, test_y, steps=200, lr=0.05)
  assert acc > 0.95
  assert classification.linear_probe(train_x, train_y, test_x, test_y, steps=200, lr=0.05,
                                     num_classes=5) > 0.95
