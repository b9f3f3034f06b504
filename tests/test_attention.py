"""The attention core (model.attention): 'heads_major' against jax.nn.dot_product_attention
('jax', the default), alone and in a whole SCALE objective, forward and gradients, with padded
keys and queries that have no valid key at all (an absent modality)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from configs import tiny
from scale_jax import config_check, losses, modalities
from scale_jax.model.layers import attention_for, heads_major_attention, jax_attention
from scale_jax.state import build_model


def rel_err(a, b):
  a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
  return float(jnp.linalg.norm((a - b).ravel()) / jnp.linalg.norm(b.ravel()))


def qkv_and_mask(dtype, batch=3, length=37, heads=4, head_dim=8):  # odd length on purpose
  q, k, v, cotangent = (jax.random.normal(jax.random.key(i), (batch, length, heads, head_dim),
                                          dtype) for i in range(4))
  valid = jax.random.bernoulli(jax.random.key(9), 0.7, (batch, length)).at[:, 0].set(True)
  return q, k, v, cotangent, valid.at[1].set(False)  # example 1: no valid key


@pytest.mark.parametrize('dtype,rtol', [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_heads_major_attention_matches_jax_nn(dtype, rtol):
  q, k, v, cotangent, valid = qkv_and_mask(dtype)

  def loss(attend, q, k, v):  # nonlinear, so that the backward needs the forward's output
    out = attend(q, k, v, valid).astype(jnp.float32)
    return jnp.sum(out * cotangent) + 0.5 * jnp.sum(out ** 2)

  out, ref = heads_major_attention(q, k, v, valid), jax_attention(q, k, v, valid)
  assert out.dtype == ref.dtype == dtype and out.shape == ref.shape
  assert rel_err(out, ref) < rtol
  # The query without a valid key attends to every key alike, as in jax.nn.
  np.testing.assert_allclose(np.asarray(out[1], np.float32),
                             np.broadcast_to(np.asarray(v[1], np.float32).mean(0), out[1].shape),
                             rtol=rtol, atol=rtol)
  grads = jax.jit(jax.grad(lambda *a: loss(heads_major_attention, *a), argnums=(0, 1, 2)))
  ref_grads = jax.jit(jax.grad(lambda *a: loss(jax_attention, *a), argnums=(0, 1, 2)))
  for name, g, g_ref in zip('qkv', grads(q, k, v), ref_grads(q, k, v)):
    assert g.dtype == dtype, name
    assert rel_err(g, g_ref) < rtol, (name, rel_err(g, g_ref))


def test_tiny_scale_objective_and_gradients_match_across_attentions():
  """Every modality, absent ones included (random_batch drops some), through encoders and the
  joint co-transformer."""
  config = tiny.get_config()
  batch = modalities.random_batch(config, config.batch_size, np.random.default_rng(0))
  results = {}
  for attention in ('jax', 'heads_major'):
    c = config.copy_and_resolve_references()
    c.model.attention = attention
    config_check.check(c)
    model = build_model(c)
    params = nn.unbox(jax.jit(model.init)(jax.random.key(0), batch))['params']
    fn = lambda p, model=model, c=c: losses.scale_objective(
        model.apply({'params': p}, batch), batch, c)[0]
    results[attention] = jax.jit(jax.value_and_grad(fn))(params)
  (loss, g), (loss_ref, g_ref) = results['heads_major'], results['jax']
  np.testing.assert_allclose(float(loss), float(loss_ref), rtol=1e-5)
  flat = lambda t: jnp.concatenate([x.ravel() for x in jax.tree.leaves(t)])
  assert rel_err(flat(g), flat(g_ref)) < 1e-4


def test_unknown_attention_is_refused_and_a_config_saved_without_one_takes_jax():
  config = tiny.get_config()
  config.model.attention = 'flash'
  with pytest.raises(config_check.ConfigError, match=r"config.model.attention='flash': one of "
                     r'jax, heads_major'):
    config_check.check(config)
  with pytest.raises(ValueError, match='model.attention must be one of'):
    attention_for('flash')
  del config.model['attention']  # as in a config.json written before the field existed
  config_check.check(config)
  assert attention_for('jax') is jax_attention
  # The model built from it computes exactly what an explicit 'jax' computes.
  batch = modalities.random_batch(config, config.batch_size, np.random.default_rng(0))
  explicit = config.copy_and_resolve_references()
  explicit.model.attention = 'jax'
  outputs = []
  for c in (config, explicit):
    model = build_model(c)
    variables = jax.jit(model.init)(jax.random.key(0), batch)
    outputs.append(jax.jit(model.apply)(variables, batch))
  for a, b in zip(jax.tree.leaves(outputs[0]), jax.tree.leaves(outputs[1])):
    np.testing.assert_array_equal(a, b)
