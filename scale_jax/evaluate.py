r"""Evaluates pretrained product features against the same model at random initialisation.

    python -m scale_jax.evaluate --workdir DIR [--config.x=y ...]

The run's own config (DIR/config.json, written by the trainer) unless --config FILE is given.

Product feature: the mean of the L2-normalised fused vectors (joint co-transformer output at each
modality's global token) over the modalities the product has. Reports, on the test split:
  - coarse-grained retrieval (relevant = same category), every test product a query against all
    others: mAP@k = mean over queries of (1 / hits@k) * sum_{i <= k, rel_i} precision@i, 0 where
    the top k hold no relevant product;
  - linear-probe accuracy: softmax regression fitted on train-split features.
Prints a table and writes DIR/eval.json.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from scale_jax import cli, config_check, losses, modalities, sharding
from scale_jax import train as trainer  # (train imports this module too: attributes used late)
from scale_jax.data import pipeline

KS = (1, 5, 10)


def make_product_features(model, config, mesh):
  """features(params, split) -> (features [N, D], category labels [N]) of every product in a
  split, as numpy on every process. The jitted feature function is built once, so evaluating
  again during training does not compile again.

  Every process reads the whole split and hands JAX the whole batch (global_shape = its shape),
  of which each device keeps its rows; the features are gathered back to every process, so all
  processes run the same computations (multi-host safe).
  """
  shardings = sharding.batch_sharding(mesh, modalities.dummy_batch(config, 1, train=False))

  @jax.jit
  def features(params, batch):
    out = model.apply({'params': params}, batch)
    fused = losses.l2_normalize(out['fused'])
    present = batch['present'][..., None]
    return losses.l2_normalize(jnp.sum(jnp.where(present, fused, 0.0), axis=1))

  def product_features(params, split):
    feats, labels = [], []
    for batch, n in pipeline.eval_batches(config, split, config.eval.batch_size):
      on_device = jax.tree.map(
          lambda s, x: jax.make_array_from_process_local_data(s, x, x.shape), shardings, batch)
      gathered = multihost_utils.process_allgather(features(params, on_device), tiled=True)
      feats.append(np.asarray(gathered)[:n])
      labels.append(batch['label'][:n])
    return np.concatenate(feats), np.concatenate(labels)

  return product_features


def retrieval_map(features, labels, ks=KS) -> dict:
  """mAP@k of same-label retrieval, each product a query against all the others."""
  sims = features @ features.T
  np.fill_diagonal(sims, -np.inf)
  depth = min(max(ks), len(labels) - 1)  # a tiny gallery holds fewer than k others
  top = np.argsort(-sims, axis=1)[:, :depth]
  relevant = labels[top] == labels[:, None]  # [N, depth]
  precision_at = np.cumsum(relevant, axis=1) / np.arange(1, depth + 1)
  out = {}
  for k in ks:
    hits = relevant[:, :k].sum(1)
    ap = (precision_at[:, :k] * relevant[:, :k]).sum(1) / np.maximum(hits, 1)
    out[f'mAP@{k}'] = float(ap.mean())
  return out


def linear_probe(train_x, train_y, test_x, test_y, steps, lr) -> float:
  """Test accuracy of softmax regression fitted (full batch, Adam) on standardised features."""
  mean, std = train_x.mean(0), train_x.std(0) + 1e-6
  train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
  classes = int(max(train_y.max(), test_y.max())) + 1
  params = (jnp.zeros((train_x.shape[1], classes)), jnp.zeros(classes))
  tx = optax.adamw(lr, weight_decay=1e-4)

  def loss(p):
    logits = train_x @ p[0] + p[1]
    return optax.softmax_cross_entropy_with_integer_labels(logits, train_y).mean()

  @jax.jit
  def fit(params):
    def step(carry, _):
      p, s = carry
      updates, s = tx.update(jax.grad(loss)(p), s, p)
      return (optax.apply_updates(p, updates), s), None
    return jax.lax.scan(step, (params, tx.init(params)), length=steps)[0][0]

  w, b = fit(params)
  return float(np.mean(np.argmax(test_x @ np.asarray(w) + np.asarray(b), 1) == test_y))


def make_evaluator(model, config, mesh):
  """evaluator(params) -> {'mAP@1', 'mAP@5', 'mAP@10', 'probe acc'}: retrieval on the test split,
  linear probe fitted on the train split. The trainer calls it every config.eval.every steps."""
  product_features = make_product_features(model, config, mesh)

  def evaluator(params) -> dict:
    test_x, test_y = product_features(params, 'test')
    train_x, train_y = product_features(params, 'train')
    results = retrieval_map(test_x, test_y)
    results['probe acc'] = linear_probe(train_x, train_y, test_x, test_y,
                                        config.eval.probe_steps, config.eval.probe_lr)
    return results

  return evaluator


def evaluate(config, workdir) -> dict:
  mesh = sharding.make_mesh(config.mesh)
  config_check.check(config, mesh)
  model = trainer.build_model(config)
  tx, _ = trainer.make_optimizer(config)
  init, shardings = trainer.sharded_state_init(model, tx, config, mesh)
  random_state = init(jax.random.key(config.seed))
  manager = trainer.checkpoint_manager(workdir, config)
  step = manager.latest_step()
  if step is None:
    raise FileNotFoundError(f'no checkpoint in {manager.directory}; train first with '
                            f'`python -m scale_jax.train --config ... --workdir {workdir}`')
  trainer.check_checkpoint_matches(workdir, step, random_state.params, config)
  trained = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(trainer.abstract_like(random_state, shardings)))).state
  manager.close()
  evaluator = make_evaluator(model, config, mesh)
  results = {'random init': evaluator(random_state.params),
             f'pretrained (step {step})': evaluator(trained.params)}
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'eval.json'), 'w', encoding='utf-8') as f:
      json.dump(results, f, indent=1)
  return results


def format_table(results) -> str:
  cols = list(next(iter(results.values())))
  width = max(len(r) for r in results) + 2
  lines = [''.ljust(width) + ''.join(c.rjust(11) for c in cols)]
  for row, metrics in results.items():
    lines.append(row.ljust(width) + ''.join(f'{100 * metrics[c]:11.2f}' for c in cols))
  return '\n'.join(lines)


def main(config, workdir):
  results = evaluate(config, workdir)
  print('\nCoarse-grained retrieval (test split, same category) and linear probe, in %:')
  print(format_table(results))


if __name__ == '__main__':
  cli.run(main)
