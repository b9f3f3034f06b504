import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from scale_jax import MODALITIES, losses, sharding
from scale_jax.data import pipeline
from scale_jax.train import build_model, make_optimizer, sharded_state_init


@pytest.fixture(scope='module')
def setup(data_dir):
  from configs import tiny
  config = tiny.get_config()
  config.data.dir = data_dir
  batch = next(iter(pipeline.train_dataset(config)))
  model = build_model(config)
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), batch))['params']

  @jax.jit
  def loss_and_grad(params, batch):
    fn = lambda p: losses.scale_objective(model.apply({'params': p}, batch), batch, config)
    return jax.value_and_grad(fn, has_aux=True)(params)

  return config, model, params, batch, loss_and_grad


def test_absent_modality_content_changes_nothing(setup):
  config, model, params, batch, loss_and_grad = setup
  batch = dict(batch)
  batch['present'] = batch['present'].copy()
  batch['present'][0, MODALITIES.index('image')] = False
  batch['image_valid'] = batch['image_valid'].copy()
  batch['image_valid'][0] = False
  noisy = dict(batch)
  noisy['image_input'] = batch['image_input'].copy()
  noisy['image_input'][0] = np.random.default_rng(0).normal(size=batch['image_input'][0].shape)
  out_a, out_b = model.apply({'params': params}, batch), model.apply({'params': params}, noisy)
  keep = [i for i, m in enumerate(MODALITIES) if m != 'image']
  np.testing.assert_allclose(out_a['fused'][0, keep], out_b['fused'][0, keep], atol=1e-6)
  (la, ta), _ = loss_and_grad(params, batch)
  (lb, tb), _ = loss_and_grad(params, noisy)
  for k in ta:
    np.testing.assert_allclose(ta[k], tb[k], rtol=1e-6, atol=1e-6, err_msg=k)


def test_gradients_reach_every_modality(setup):
  _, _, params, batch, loss_and_grad = setup
  (loss, terms), grads = loss_and_grad(params, batch)
  assert np.isfinite(float(loss))
  assert all(np.isfinite(v) for v in jax.tree.leaves(terms))
  for m in MODALITIES:
    g = grads[f'encoders_{m}']
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(g))
    assert sum(float(jnp.abs(x).sum()) for x in jax.tree.leaves(g)) > 0, m
  assert float(jnp.abs(grads['token_embed']['embedding']).sum()) > 0


def test_fsdp_shards_parameters_and_optimizer_state(config):
  config.mesh.update(data=2, fsdp=2)
  mesh = sharding.make_mesh(config.mesh)
  model, (tx, _) = build_model(config), make_optimizer(config)
  init, shardings = sharded_state_init(model, tx, config, mesh)
  state = init(jax.random.key(0))
  kernel = state.params['joint']['block_0']['mlp_in']['kernel']  # (embed, mlp)
  assert kernel.sharding.spec[0] == 'fsdp'
  assert kernel.addressable_shards[0].data.shape == (kernel.shape[0] // 2, kernel.shape[1])
  mu = state.opt_state[1][0].mu['joint']['block_0']['mlp_in']['kernel']
  assert mu.sharding == kernel.sharding


def test_mesh_sizes():
  assert sharding.make_mesh({'data': -1, 'fsdp': 2, 'tensor': 1}).shape == {
      'data': 2, 'fsdp': 2, 'tensor': 1}
  with pytest.raises(ValueError, match='needs 8 devices'):
    sharding.make_mesh({'data': 8, 'fsdp': 1, 'tensor': 1})
