import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from scale_jax import losses, modalities, sharding
from scale_jax.data import pipeline
from scale_jax.modalities import MODALITIES
from scale_jax.state import build_model, make_optimizer, sharded_state_init


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
  apply = jax.jit(model.apply)
  out_a, out_b = apply({'params': params}, batch), apply({'params': params}, noisy)
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


def _variant(data_dir, modalities=None, **model):
  from configs import tiny
  config = tiny.get_config()
  config.data.dir = data_dir
  config.modalities = modalities or config.modalities
  config.model.update(model)
  return config


def _subset(batch, config):
  """A five-modality batch cut down to the config's modalities."""
  keep = modalities.active(config)
  out = {k: v for k, v in batch.items() if k.split('_')[0] in keep or '_' not in k}
  out['present'] = batch['present'][:, [MODALITIES.index(m) for m in keep]]
  return out


def _loss_and_grads(config, batch):
  model = build_model(config)
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), batch))['params']
  fn = lambda p, b: losses.scale_objective(model.apply({'params': p}, b), b, config)
  (loss, terms), grads = jax.jit(jax.value_and_grad(fn, has_aux=True))(params, batch)
  return params, loss, terms, grads


def test_shared_encoders_have_one_set_of_parameters(setup, data_dir):
  _, _, params, batch, _ = setup
  config = _variant(data_dir, share_text_table=True, share_image_video=True)
  shared, loss, _, grads = _loss_and_grads(config, batch)
  assert 'encoders_text' in shared and 'encoders_table' not in shared
  assert 'encoders_image' in shared and 'encoders_video' not in shared
  count = lambda tree: sum(x.size for x in jax.tree.leaves(tree))
  assert count(shared) == count(params) - count(params['encoders_table']) - count(
      params['encoders_video'])
  assert np.isfinite(float(loss)) and float(jnp.abs(grads['encoders_text']['ln_final']['scale']).sum()) > 0


def _stack_layers(tree):
  """Per-layer parameters (block_0, block_1, ...) -> the scanned layout ('blocks', stacked)."""
  if not isinstance(tree, dict):
    return tree
  blocks = sorted(k for k in tree if k.startswith('block_'))
  out = {k: _stack_layers(v) for k, v in tree.items() if k not in blocks}
  if blocks:
    out['blocks'] = jax.tree.map(lambda *xs: jnp.stack(xs), *(tree[k] for k in blocks))
  return out


def test_scanned_and_rematerialised_encoders_compute_the_same(setup, data_dir):
  _, _, _, batch, _ = setup
  two = ('text', 'image')  # two modalities keep the compile short
  plain = _variant(data_dir, two, encoder_layers=2, joint_layers=2)
  scanned = _variant(data_dir, two, encoder_layers=2, joint_layers=2, scan_layers=True,
                     remat='full')
  batch = _subset(batch, plain)
  p_plain, loss_plain, _, g_plain = _loss_and_grads(plain, batch)
  p_scan, loss_scan, _, _ = _loss_and_grads(scanned, batch)
  assert p_scan['encoders_text']['blocks']['mlp_in']['kernel'].shape[0] == 2  # stacked layers
  assert jax.tree.structure(_stack_layers(p_plain)) == jax.tree.structure(p_scan)
  # The same parameters, laid out per layer or stacked: the same loss and gradients.
  fn = lambda p, b: losses.scale_objective(build_model(scanned).apply({'params': p}, b), b,
                                           scanned)[0]
  loss_s, grads_s = jax.jit(jax.value_and_grad(fn))(_stack_layers(p_plain), batch)
  np.testing.assert_allclose(loss_s, loss_plain, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-6),
               grads_s, _stack_layers(g_plain))


def test_masked_heads_on_encoder_see_only_their_modality(setup, data_dir):
  _, _, _, batch, _ = setup
  config = _variant(data_dir, masked_heads_on='encoder')
  model = build_model(config)
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), batch))['params']
  other = dict(batch, image_input=batch['image_input'] + 1.0)
  apply = jax.jit(model.apply)
  a, b = apply({'params': params}, batch), apply({'params': params}, other)
  np.testing.assert_allclose(a['predictions']['text'], b['predictions']['text'], atol=1e-6)
  joint = _variant(data_dir)
  model = build_model(joint)
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), batch))['params']
  apply = jax.jit(model.apply)
  a, b = apply({'params': params}, batch), apply({'params': params}, other)
  assert np.abs(a['predictions']['text'] - b['predictions']['text']).max() > 1e-4


@pytest.mark.parametrize('weighting', ['learned', 'uniform', 'none'])
def test_weighting_modes_train(setup, data_dir, weighting):
  _, _, _, batch, _ = setup
  config = _variant(data_dir, ('text', 'table', 'image'), weighting=weighting,
                    contrastive='nt_xent', absent='zero', learn_temperature=True)
  params, loss, terms, grads = _loss_and_grads(config, _subset(batch, config))
  assert np.isfinite(float(loss))
  assert float(jnp.abs(grads['log_temperature'])) > 0
  if weighting == 'learned':
    assert float(jnp.abs(grads['log_variances']).sum()) > 0


def test_bfloat16_compute_keeps_float32_parameters(setup, data_dir):
  _, _, _, batch, _ = setup
  config = _variant(data_dir, ('text', 'image', 'audio'), dtype='bfloat16')
  params, loss, terms, grads = _loss_and_grads(config, _subset(batch, config))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(grads))
  assert np.isfinite(float(loss)) and all(np.isfinite(float(v)) for v in terms.values())


def test_decoding_only_the_masked_tokens_changes_nothing(setup, data_dir):
  """config.<text|table>.max_masked: the MLM/MEM heads decode the masked positions only, and
  the objective and its gradient are those of decoding every position."""
  config, _, _, batch, _ = setup
  limits = {m: max(1, int(batch[f'{m}_masked'].sum(1).max())) for m in ('text', 'table')}
  assert all(limits[m] < config[m].max_len for m in limits)  # fewer positions really decoded
  limited = _variant(data_dir)
  for m, limit in limits.items():
    limited[m].max_masked = limit
  params, loss, terms, grads = _loss_and_grads(limited, batch)
  _, ref_loss, ref_terms, ref_grads = _loss_and_grads(_variant(data_dir), batch)
  for k in ref_terms:
    np.testing.assert_allclose(terms[k], ref_terms[k], rtol=1e-5, atol=1e-6, err_msg=k)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  out = jax.jit(build_model(limited).apply)({'params': params}, batch)
  for m, limit in limits.items():
    assert out['predictions'][m].shape == (config.batch_size, limit, config.model.vocab_size)
