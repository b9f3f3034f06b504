"""Category classification: a linear probe on frozen product features, and fine-tuning of the
encoders with a classification head (the paper's two protocols)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm
from absl import logging
from flax import linen as nn

from scale_jax import modalities
from scale_jax.data import build
from scale_jax.evaluators import base, features


def linear_probe(train_x, train_y, test_x, test_y, steps, lr, num_classes=None) -> float:
  """Test accuracy of softmax regression fitted on train features.

  Features are standardised with the train split's mean and std; the regression is fitted full
  batch with AdamW (weight decay 1e-4) for `steps` steps in one jitted lax.scan. num_classes
  defaults to the largest label in either split + 1.
  """
  train_x = np.asarray(train_x, np.float32)
  test_x = np.asarray(test_x, np.float32)
  train_y, test_y = np.asarray(train_y), np.asarray(test_y)
  mean, std = train_x.mean(0), train_x.std(0) + 1e-6
  train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
  if num_classes is None:
    num_classes = int(max(train_y.max(initial=0), test_y.max(initial=0))) + 1
  params = (jnp.zeros((train_x.shape[1], num_classes)), jnp.zeros(num_classes))
  tx = optax.adamw(lr, weight_decay=1e-4)

  # x and y are arguments, not closed over: closed-over arrays become constants in the program.
  @jax.jit
  def fit(params, x, y):
    def loss(p):
      return optax.softmax_cross_entropy_with_integer_labels(x @ p[0] + p[1], y).mean()

    def step(carry, _):
      p, s = carry
      updates, s = tx.update(jax.grad(loss)(p), s, p)
      return (optax.apply_updates(p, updates), s), None

    return jax.lax.scan(step, (params, tx.init(params)), length=steps)[0][0]

  w, b = fit(params, jnp.asarray(train_x), jnp.asarray(train_y, jnp.int32))
  return float(np.mean(np.argmax(test_x @ np.asarray(w) + np.asarray(b), 1) == test_y))


class Head(nn.Module):
  """The paper's fine-tuning head on the concatenated fused vectors: Linear -> 1024 (ReLU) ->
  dropout -> Linear."""
  classes: int
  hidden: int = 1024
  dropout: float = 0.1

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.relu(nn.Dense(self.hidden)(x))
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return nn.Dense(self.classes)(x)


class FineTuner:
  """Fine-tuning as in the paper: the pretrained encoders and a fresh Head trained together
  (AdamW at `lr`, `steps` steps of config.eval.batch_size products, reshuffled every pass). The
  head reads every modality's fused vector, concatenated, with zeros for the modalities outside
  the combination or absent (so one compiled step serves every combination); the inputs are
  restricted to the combination as config.eval.protocol says."""

  def __init__(self, extractor, classes, steps, lr):
    """`extractor`: the evaluation's features.FeatureExtractor, whose model, config, mesh and
    batches this uses."""
    model, config = extractor.model, extractor.config
    self.extractor, self.config, self.steps = extractor, config, steps
    self.names = modalities.active(config)
    self.head = Head(classes)
    self.tx = optax.adamw(lr, weight_decay=0.01)
    restrict_inputs = config.eval.protocol == 'only'

    def logits(variables, batch, keep, rng, train):
      if restrict_inputs:
        batch = features.restrict(batch, keep, self.names)
      fused = model.apply({'params': variables['model']}, batch, rngs={'dropout': rng})['fused']
      fused = jnp.where((batch['present'] & keep)[..., None], fused, 0.0)
      return self.head.apply({'params': variables['head']}, fused.reshape(len(fused), -1),
                             train=train, rngs={'dropout': rng})

    def step(variables, opt_state, batch, real, keep, rng):
      def loss(v):
        ce = optax.softmax_cross_entropy_with_integer_labels(
            logits(v, batch, keep, rng, True), batch['label'])
        return jnp.sum(jnp.where(real, ce, 0.0)) / jnp.maximum(jnp.sum(real), 1)
      updates, opt_state = self.tx.update(jax.grad(loss)(variables), opt_state, variables)
      return optax.apply_updates(variables, updates), opt_state

    @jax.jit
    def correct(variables, batch, real, keep):
      predicted = jnp.argmax(logits(variables, batch, keep, jax.random.key(0), False), -1)
      return jnp.sum((predicted == batch['label']) & real)

    self._step_fn, self._step, self._correct = step, None, correct

  def _device_batches(self, split, rows):
    """(batch on the mesh, which of its rows are real products) of records `rows`."""
    sharded_like_labels = self.extractor.shardings['label']
    for batch, on_device, n in self.extractor.device_batches(split, rows):
      real = np.arange(len(batch['label'])) < n
      yield on_device, jax.make_array_from_process_local_data(sharded_like_labels, real,
                                                              real.shape)

  def __call__(self, params, train_rows, split, test_rows, combination) -> float:
    """Accuracy on records `test_rows` of `split` after fine-tuning on the train split's
    records `train_rows`."""
    seed = self.config.seed
    keep = jnp.array([m in combination for m in self.names])
    width = len(self.names) * self.config.model.width
    head = self.head.init(jax.random.key(seed), jnp.zeros((1, width)), train=False)['params']
    replicated = jax.sharding.NamedSharding(self.extractor.mesh, jax.sharding.PartitionSpec())
    on_mesh = lambda tree: jax.tree.map(  # fresh arrays (the head, Adam's count) replicated
        lambda x: x if isinstance(x.sharding, jax.sharding.NamedSharding)
        else jax.device_put(x, replicated), tree)
    variables = on_mesh({'model': params, 'head': head})
    opt_state = on_mesh(self.tx.init(variables))
    if self._step is None:  # the state keeps its shardings step after step: one compilation
      layout = lambda tree: jax.tree.map(lambda x: x.sharding, tree)
      self._step = jax.jit(self._step_fn, out_shardings=(layout(variables), layout(opt_state)))
    rng, done, epoch = jax.random.key(seed + 1), 0, 0
    progress = tqdm.tqdm(total=self.steps, desc=f'fine-tuning: {features.name(combination)}',
                         leave=False, disable=jax.process_index() != 0)
    while done < self.steps:
      order = np.random.default_rng([seed, epoch]).permutation(train_rows)
      for batch, real in self._device_batches('train', order):
        rng, key = jax.random.split(rng)
        variables, opt_state = self._step(variables, opt_state, batch, real, keep, key)
        done += 1
        progress.update(1)
        if done == self.steps:
          break
      epoch += 1
    progress.close()
    hits = sum(int(features.FeatureExtractor.gather(self._correct(variables, b, r, keep)))
               for b, r in self._device_batches(split, test_rows))
    return hits / max(len(test_rows), 1)


class Evaluator(base.Evaluator):
  """Category classification on frozen features (method='probe': softmax regression on a sample
  of config.eval.train_products train products) or fine-tuned (method='finetune': the encoders
  from the checkpoint and a Head trained together at `lr`, as in the paper), accuracy on the
  evaluated split, for every combination."""

  def __init__(self, name, config, method='probe', steps=500, lr=0.01, every=0,
               combinations=None):
    super().__init__(name, config, every, combinations)
    if method not in ('probe', 'finetune'):
      raise ValueError(f"config.evals.{name}.method={method!r}: 'probe' or 'finetune'")
    self.config, self.method, self.steps, self.lr = config, method, int(steps), float(lr)
    self._finetuner = None

  def describe(self):
    if self.method == 'probe':
      return f'linear probe on frozen features ({self.steps} steps), accuracy'
    return (f'fine-tuning of the encoders with a 1024-wide head ({self.steps} steps at lr '
            f'{self.lr:g}), accuracy')

  def __call__(self, context):
    test, train = context.features(), context.features('train')
    classes = len(build.load_categories(self.config.data.dir))
    if self.method == 'finetune' and self._finetuner is None:  # compiled once, used for every call
      self._finetuner = FineTuner(context.extractor, classes, self.steps, self.lr)
    out = {}
    for combo, combination in zip(self.combination_names(), self.combinations):
      fit, held = train.has[combo], test.has[combo]
      if not (fit.any() and held.any()):  # nothing to learn from or to test: undefined, not 0
        out[combo] = {'accuracy': math.nan, 'products': int(held.sum())}
        continue
      unseen = int(np.sum(~np.isin(test.labels[held], train.labels[fit])))
      if unseen:  # a long tail, or a split by instance, leaves some categories out of train
        logging.warning('%s, %s: %d of %d test products are of a category no train product of '
                        'the combination has; they count as wrong (accuracy at most %.1f%%)',
                        self.name, combo, unseen, held.sum(), 100 * (1 - unseen / held.sum()))
      if self.method == 'probe':
        accuracy = linear_probe(train.features[combo][fit], train.labels[fit],
                                test.features[combo][held], test.labels[held], self.steps,
                                self.lr, classes)
      else:
        accuracy = self._finetuner(context.params, train.rows[fit], test.split, test.rows[held],
                                   combination)
      out[combo] = {'accuracy': accuracy, 'products': int(held.sum())}
    return out
