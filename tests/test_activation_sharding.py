"""Activation shardings take effect: the compiled step holds the model's constraints on every
mesh, they remove the activation re-layouts XLA adds on its own, and the losses do not depend on
the mesh."""
import re

import jax
import numpy as np
import pytest

from configs import tiny
from scale_jax import modalities, sharding
from scale_jax import state as run_state
from scale_jax import train as trainer

MESHES = {'data=4': dict(data=4, fsdp=1, tensor=1), 'fsdp=4': dict(data=1, fsdp=4, tensor=1),
          'fsdp=2,tensor=2': dict(data=1, fsdp=2, tensor=2)}
COLLECTIVES = ('all-gather', 'all-reduce', 'all-to-all', 'collective-permute')


def _config(data_dir, mesh):
  c = tiny.get_config()
  c.data.dir, c.modalities, c.batch_size = data_dir, ('text', 'image'), 8
  c.mesh.update(mesh)
  return c


def _compiled_step(config, constrained=True, monkeypatch=None):
  mesh = sharding.make_mesh(config.mesh)
  if not constrained:  # the model as it was: no mesh, so every constraint is a no-op
    build = run_state.build_model
    monkeypatch.setattr(run_state, 'build_model', lambda c, mesh=None: build(c))
  setup = trainer.build_train_setup(config, mesh)
  lowered = setup.train_step.lower(setup.abstract_state, setup.abstract_batch)
  hlo = lowered.compile().as_text()
  counts = {op: len(re.findall(rf'= [^\n=]*? {op}(?:-start)?\(', hlo)) for op in COLLECTIVES}
  return setup, lowered.as_text().count('sharding_constraint'), counts


@pytest.fixture(scope='module')
def steps(data_dir):
  """Per mesh: (setup, constraints in the lowered step, collectives in the compiled step, the
  metrics of one step from the same initial state and batch)."""
  batch = modalities.random_batch(_config(data_dir, MESHES['data=4']), 8,
                                  np.random.default_rng(0))
  out = {}
  for name, mesh in MESHES.items():
    setup, constraints, counts = _compiled_step(_config(data_dir, mesh))
    state = setup.init(jax.random.key(0))
    _, metrics = setup.train_step(state, jax.device_put(batch, setup.batch_shardings))
    out[name] = (constraints, counts, jax.device_get(metrics))
  return out


def test_every_mesh_holds_the_constraints_and_the_same_losses(steps):
  reference = steps['data=4'][2]
  for name, (constraints, _, metrics) in steps.items():
    # embed + one per block for the residual stream, the MLP hidden and q, k, v: all there.
    assert constraints == steps['data=4'][0] >= 10, name
    for key in ('loss', 'contrastive', 'grad_norm'):
      if key in reference:
        np.testing.assert_allclose(metrics[key], reference[key], rtol=2e-5, err_msg=f'{name} {key}')


def test_collectives_are_what_the_rules_imply(steps, data_dir, monkeypatch):
  # data=4: activations and parameters never move; only gradients are summed.
  counts = steps['data=4'][1]
  assert counts['all-to-all'] == counts['collective-permute'] == 0 and counts['all-reduce'] > 0
  # fsdp=4: the batch stays split over fsdp (rule 'batch'), parameters are gathered for use and
  # their gradients reduced; without the constraints XLA re-lays activations out with
  # all-to-alls (20 here, in the LayerNorm backward), with them only a handful remain.
  fsdp = steps['fsdp=4'][1]
  assert fsdp['all-gather'] > counts['all-gather'] and fsdp['all-reduce'] > 0
  _, none, unconstrained = _compiled_step(_config(data_dir, MESHES['fsdp=4']), False, monkeypatch)
  assert none == 0
  assert fsdp['all-to-all'] <= 4 < unconstrained['all-to-all']
  # tensor=2: the heads and MLP dimensions are split, so the row-parallel matmuls all-reduce.
  assert steps['fsdp=2,tensor=2'][1]['all-reduce'] > counts['all-reduce']
