"""Each loss against a plain numpy reference, on random inputs."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import tiny
from scale_jax import losses


def _np_harmonized(v, present):
  out = np.zeros(v.shape[:1] + (v.shape[1],) * 2)
  for b in range(v.shape[0]):
    idx = np.flatnonzero(present[b])
    u = v[b, idx] / np.linalg.norm(v[b, idx], axis=-1, keepdims=True)
    c = 0.5 * (1 + u @ u.T)
    s = np.exp(c) / np.exp(c).sum(-1, keepdims=True)
    r = c * s
    out[b][np.ix_(idx, idx)] = r / np.linalg.norm(r, axis=-1, keepdims=True)
  return out


def test_harmonized_weights_match_reference_and_exclude_absent():
  rng = np.random.default_rng(0)
  v = rng.normal(size=(6, 5, 8)).astype(np.float32)
  present = rng.random((6, 5)) < 0.7
  present[:, 0] = True
  g = np.asarray(losses.harmonized_weights(jnp.asarray(v), jnp.asarray(present)))
  np.testing.assert_allclose(g, _np_harmonized(v, present), rtol=1e-5, atol=1e-6)
  norms = np.linalg.norm(g, axis=-1)
  np.testing.assert_allclose(norms[present], 1.0, rtol=1e-5)
  assert (norms[~present] == 0).all() and (g >= 0).all()
  uniform = np.asarray(losses.harmonized_weights(jnp.asarray(v), jnp.asarray(present), 'uniform'))
  n = present.sum(1)
  np.testing.assert_allclose(uniform[present], (1 / np.sqrt(n)[:, None] * present)[
      np.nonzero(present)[0]], rtol=1e-5)


def _np_info_nce(za, zb, va, vb, wab, wba, t):
  logits = za @ zb.T / t
  both = np.flatnonzero(va & vb)
  ab, ba = [], []
  for i in both:
    cand = np.flatnonzero(vb)
    ab.append(wab[i] * -(logits[i, i] - np.log(np.exp(logits[i, cand]).sum())))
    cand = np.flatnonzero(va)
    ba.append(wba[i] * -(logits[i, i] - np.log(np.exp(logits[cand, i]).sum())))
  return 0.5 * (np.mean(ab) + np.mean(ba))


def _random_pair(seed, n):
  """Unit vectors of two modalities, their presence (some absent) and per-product weights."""
  rng = np.random.default_rng(seed)
  za, zb = (x / np.linalg.norm(x, axis=-1, keepdims=True)
            for x in rng.normal(size=(2, n, 4)).astype(np.float32))
  va, vb = rng.random(n) < 0.8, rng.random(n) < 0.8
  va[0] = vb[0] = True
  wab, wba = rng.random(n).astype(np.float32), rng.random(n).astype(np.float32)
  return za, zb, va, vb, wab, wba


def test_info_nce_matches_reference():
  args = _random_pair(1, 10)
  got = losses.info_nce(*map(jnp.asarray, args), 0.07)
  np.testing.assert_allclose(got, _np_info_nce(*args, 0.07), rtol=1e-5)


def test_info_nce_gradient_is_finite_when_a_side_is_absent_everywhere():
  za = jnp.ones((4, 3)) / jnp.sqrt(3.0)
  grad = jax.grad(lambda z: losses.info_nce(z, za, jnp.ones(4, bool), jnp.zeros(4, bool),
                                            jnp.ones(4), jnp.ones(4), 0.07))(za)
  assert jnp.isfinite(grad).all()


def test_token_and_regression_losses_match_reference():
  rng = np.random.default_rng(2)
  logits = rng.normal(size=(3, 5, 7)).astype(np.float32)
  targets = rng.integers(0, 7, (3, 5))
  masked = rng.random((3, 5)) < 0.5
  masked[2] = False  # a product without masked positions does not count
  weight = rng.random(3).astype(np.float32)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  ce = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
  expected = np.mean([weight[b] * ce[b][masked[b]].mean() for b in range(2)])
  got = losses.token_loss(*map(jnp.asarray, (logits, targets, masked, weight)))
  np.testing.assert_allclose(got, expected, rtol=1e-5)

  pred, target = rng.normal(size=(2, 3, 4, 6)).astype(np.float32)
  m = np.array([[True, False, True, False], [False, False, True, True]])
  norm = (target - target.mean(-1, keepdims=True)) / np.sqrt(target.var(-1, keepdims=True) + 1e-6)
  se = ((pred - norm) ** 2).mean(-1)
  expected = np.mean([weight[b] * se[b][m[b]].mean() for b in range(2)])
  got = losses.regression_loss(*map(jnp.asarray, (pred[:2], target[:2], m, weight[:2])))
  np.testing.assert_allclose(got, expected, rtol=1e-5)


@pytest.mark.parametrize('bad', ['learned-typo'])
def test_unknown_weighting_is_refused(bad):
  with pytest.raises(ValueError, match='weighting must be one of'):
    losses.harmonized_weights(jnp.ones((1, 5, 2)), jnp.ones((1, 5), bool), bad)


def _np_nt_xent(za, zb, va, vb, wab, wba, t):
  both = np.flatnonzero(va & vb)
  ab, ba = [], []
  for i in both:
    for x, y, vx, vy, w, out in ((za, zb, va, vb, wab, ab), (zb, za, vb, va, wba, ba)):
      cands = [x[i] @ y[j] / t for j in np.flatnonzero(vy)]
      cands += [x[i] @ x[j] / t for j in np.flatnonzero(vx) if j != i]
      out.append(w[i] * -(x[i] @ y[i] / t - np.log(np.exp(cands).sum())))
  return 0.5 * (np.mean(ab) + np.mean(ba))


def test_nt_xent_matches_reference():
  args = _random_pair(3, 9)
  got = losses.info_nce(*map(jnp.asarray, args), 0.1, same_modality=True)
  np.testing.assert_allclose(got, _np_nt_xent(*args, 0.1), rtol=1e-5)


def test_learned_and_none_weightings():
  present = jnp.array([[True, True, False, True, True]])
  v = jnp.ones((1, 5, 3))
  s = jnp.arange(25.0).reshape(5, 5) / 10
  g = np.asarray(losses.harmonized_weights(v, present, 'learned', s))[0]
  p = np.asarray(present[0])
  np.testing.assert_allclose(g, np.exp(-np.asarray(s)) * np.outer(p, p), rtol=1e-6)
  none = np.asarray(losses.harmonized_weights(v, present, 'none'))[0]
  np.testing.assert_array_equal(none, np.outer(p, p).astype(np.float32))


def test_learned_weights_do_not_collapse():
  """Trained on the SCALE objective, each learned weight settles at 1 / (its term's loss): no
  term's weight goes to zero and no row's weight piles onto its easiest term."""
  config = tiny.get_config()
  config.modalities = ('text', 'image', 'audio')
  config.model.weighting = 'learned'
  config.loss.update(mlm=0.0, mrm=0.0, mam=0.0)
  rng = np.random.default_rng(0)
  z = losses.l2_normalize(jnp.asarray(rng.normal(size=(8, 3, 4)), jnp.float32))
  z = z.at[:, 1].set(losses.l2_normalize(z[:, 0] + 0.3 * z[:, 1]))  # text-image: an easy pair
  batch = {'present': jnp.ones((8, 3), bool)}
  outputs = lambda s: {'z': z, 'fused': z, 'predictions': {}, 'temperature': 0.5,
                       'log_variances': s}
  loss = jax.jit(jax.value_and_grad(
      lambda s: losses.scale_objective(outputs(s), batch, config)[0]))
  s, tx = jnp.zeros((3, 3)), optax.adam(0.05)
  opt = tx.init(s)
  for _ in range(600):
    _, grad = loss(s)
    update, opt = tx.update(grad, opt)
    s = optax.apply_updates(s, update)
  ones, zeros = jnp.ones(8), jnp.zeros(8)
  for i, j in ((0, 1), (0, 2), (1, 2)):
    # Each direction's unweighted loss: info_nce averages the two directions, so weigh one.
    a_to_b = 2 * losses.info_nce(z[:, i], z[:, j], ones > 0, ones > 0, ones, zeros, 0.5)
    b_to_a = 2 * losses.info_nce(z[:, i], z[:, j], ones > 0, ones > 0, zeros, ones, 0.5)
    np.testing.assert_allclose(np.exp(-s[i, j]), 1 / a_to_b, rtol=0.02)
    np.testing.assert_allclose(np.exp(-s[j, i]), 1 / b_to_a, rtol=0.02)
  weights = np.exp(-np.asarray(s))[~np.eye(3, dtype=bool)]
  assert weights.min() > 0.2 * weights.max()  # the easy pair gets more, the others keep theirs
