r"""Evaluates pretrained product features against the same model at random initialisation.

    python -m scale_jax.evaluate --config configs/demo.py --workdir DIR [--config.x=y ...]

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

from scale_jax import cli, losses, sharding
from scale_jax.data import pipeline
from scale_jax.train import (abstract_like, build_model, checkpoint_manager, make_optimizer,
                             sharded_state_init)

KS = (1, 5, 10)


def product_features(model, params, config, split, mesh):
  """Features [N, D] and category labels [N] of every product in a split."""
  batch_size = config.eval.batch_size
  shardings = sharding.batch_sharding(mesh, pipeline.dummy_batch(config, 1, train=False))

  @jax.jit
  def features(params, batch):
    out = model.apply({'params': params}, batch)
    fused = losses.l2_normalize(out['fused'])
    present = batch['present'][..., None]
    return losses.l2_normalize(jnp.sum(jnp.where(present, fused, 0.0), axis=1))

  feats, labels = [], []
  for batch, n in pipeline.eval_batches(config, split, batch_size):
    batch_on_device = jax.tree.map(jax.make_array_from_process_local_data, shardings, batch)
    feats.append(np.asarray(features(params, batch_on_device))[:n])
    labels.append(batch['label'][:n])
  return np.concatenate(feats), np.concatenate(labels)


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


def evaluate(config, workdir) -> dict:
  mesh = sharding.make_mesh(config.mesh)
  model = build_model(config)
  tx, _ = make_optimizer(config)
  init, shardings = sharded_state_init(model, tx, config, mesh)
  random_state = init(jax.random.key(config.seed))
  manager = checkpoint_manager(workdir, config)
  step = manager.latest_step()
  if step is None:
    raise FileNotFoundError(f'no checkpoint in {manager.directory}; train first with '
                            f'`python -m scale_jax.train --config ... --workdir {workdir}`')
  trained = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_like(random_state, shardings)))).state
  results = {}
  for name, state in ((f'random init', random_state), (f'pretrained (step {step})', trained)):
    test_x, test_y = product_features(model, state.params, config, 'test', mesh)
    train_x, train_y = product_features(model, state.params, config, 'train', mesh)
    results[name] = retrieval_map(test_x, test_y)
    results[name]['probe acc'] = linear_probe(train_x, train_y, test_x, test_y,
                                              config.eval.probe_steps, config.eval.probe_lr)
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
