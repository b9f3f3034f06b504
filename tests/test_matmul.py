"""The dense layers' matmuls (model.matmul) against flax's own dot_general with autodiff's
gradient ('float32', the default), in the forward pass, in the gradients, and in a whole SCALE
objective: 'float32_direct_dw' to float32 rounding, 'bf16_operands' (bf16 operands, f32
accumulation) to bf16's precision (8 significant bits: relative errors of a few 1e-3 on sums of
many products; we allow 1e-2)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from configs import tiny
from scale_jax import losses, modalities
from scale_jax.model.layers import (bf16_operands_dot_general, direct_dw_dot_general,
                                    dot_general_for)
from scale_jax.state import build_model

RTOL = {'float32_direct_dw': 1e-5, 'bf16_operands': 1e-2}  # relative to the reference's norm
DOT_GENERALS = {'float32_direct_dw': direct_dw_dot_general,
                'bf16_operands': bf16_operands_dot_general}


def rel_err(a, b):
  return float(jnp.linalg.norm((a - b).ravel()) / jnp.linalg.norm(b.ravel()))


# (module kwargs, input shape): Dense on [B, L, D] and both DenseGeneral forms of Attention.
LAYERS = [(dict(features=48), (2, 37, 32)),  # odd token count on purpose
          (dict(features=16), (2, 37, 64)),  # narrower out than in: bf16 dW through dy^T
          (dict(features=(3, 4, 8)), (2, 37, 32)),  # qkv
          (dict(features=32, axis=(-2, -1)), (2, 37, 4, 8))]  # attention out


@pytest.mark.parametrize('matmul', list(DOT_GENERALS))
@pytest.mark.parametrize('kwargs,shape', LAYERS)
def test_dense_forward_and_gradients_match_autodiff(kwargs, shape, matmul):
  x = jax.random.normal(jax.random.key(0), shape)
  ref_layer = nn.DenseGeneral(**kwargs) if 'axis' in kwargs or isinstance(
      kwargs['features'], tuple) else nn.Dense(**kwargs)
  params = ref_layer.init(jax.random.key(1), x)
  layer = ref_layer.clone(dot_general=DOT_GENERALS[matmul])
  cotangent = jax.random.normal(jax.random.key(2), ref_layer.apply(params, x).shape)

  def loss(layer, p, x):  # a nonlinear loss, so the backward needs the forward's output
    y = layer.apply(p, x)
    return jnp.sum(y * cotangent) + 0.5 * jnp.sum(y ** 2)

  y_ref, y = ref_layer.apply(params, x), layer.apply(params, x)
  assert y.dtype == jnp.float32
  assert rel_err(y, y_ref) < RTOL[matmul]
  g_ref = jax.jit(jax.grad(lambda p, x: loss(ref_layer, p, x), argnums=(0, 1)))(params, x)
  g = jax.jit(jax.grad(lambda p, x: loss(layer, p, x), argnums=(0, 1)))(params, x)
  for path, a, b in zip(jax.tree_util.tree_leaves_with_path(g_ref), jax.tree.leaves(g),
                        jax.tree.leaves(g_ref)):
    assert a.dtype == jnp.float32, path[0]
    assert a.shape == b.shape, path[0]
    assert rel_err(a, b) < RTOL[matmul], (jax.tree_util.keystr(path[0]), rel_err(a, b))


def test_unsupported_dimension_numbers_and_names_are_refused():
  a = jnp.ones((2, 3, 4))
  for dot_general in DOT_GENERALS.values():
    with pytest.raises(NotImplementedError):  # a batch axis: not what Dense asks for
      dot_general(a, a, (((2,), (1,)), ((0,), (0,))))
  with pytest.raises(ValueError):
    dot_general_for('bf16')
  assert dot_general_for('float32') is None  # flax's own lax.dot_general


def test_tiny_scale_objective_and_gradients_match_autodiff():
  """Text and image: token and patch embeddings, blocks, heads (the other encoders are the same
  layers)."""
  config = tiny.get_config()
  config.modalities = ('text', 'image')
  batch = modalities.random_batch(config, config.batch_size, np.random.default_rng(0))
  results = {}
  for matmul in ('float32', *DOT_GENERALS):
    c = config.copy_and_resolve_references()
    c.model.matmul = matmul
    model = build_model(c)
    params = nn.unbox(jax.jit(model.init)(jax.random.key(0), batch))['params']
    fn = lambda p, model=model, c=c: losses.scale_objective(
        model.apply({'params': p}, batch), batch, c)[0]
    results[matmul] = jax.jit(jax.value_and_grad(fn))(params)
  loss_ref, g_ref = results['float32']
  flat = lambda t: jnp.concatenate([x.ravel() for x in jax.tree.leaves(t)])
  for matmul in DOT_GENERALS:
    loss, g = results[matmul]
    assert np.isfinite(float(loss))
    np.testing.assert_allclose(float(loss), float(loss_ref), rtol=RTOL[matmul])
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(g))
    # The whole gradient, every parameter at once; per-layer errors compound through the depth.
    assert rel_err(flat(g), flat(g_ref)) < 5 * RTOL[matmul], matmul
