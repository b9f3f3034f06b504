"""Evaluators of product features, chosen by name in the config (big_vision's pattern):

    config.evals = dict(coarse=dict(type='retrieval', relevance='category', every=500), ...)

Each `type` is one module here (retrieval, classification, clustering) whose Evaluator is built
from its own settings and returns {combination: {metric: value}} for the combinations of
config.eval (or its own `combinations`). `evaluate(evaluators, params, ...)` computes the
features every due evaluator needs once (features.FeatureExtractor) and runs them. The trainer
runs those whose `every` divides the step, on the validation split; `python -m
scale_jax.evaluate` runs them all on the test split. Adding an evaluator is a module and a line
in TYPES; the trainer never changes.
"""
import inspect
import json
import math

from scale_jax.evaluators import classification, clustering, features, retrieval

TYPES = {'retrieval': retrieval.Evaluator, 'classification': classification.Evaluator,
         'clustering': clustering.Evaluator}


def from_config(config, names=None) -> dict:
  """{name: Evaluator} for config.evals: only `names`, if given, in that order; else all, in the
  paper's order of tasks (retrieval, classification, clustering)."""
  order = list(TYPES)
  chosen = list(names) if names else sorted(
      config.evals, key=lambda n: (order.index(config.evals[n].type)
                                   if config.evals[n].type in order else len(order), n))
  out = {}
  for name in chosen:
    if name not in config.evals:
      raise ValueError(f'no evaluator {name!r} in config.evals (it has {", ".join(config.evals)})')
    settings = dict(config.evals[name])
    kind = settings.pop('type')
    if kind not in TYPES:
      raise ValueError(f'config.evals.{name}.type={kind!r}: one of {", ".join(TYPES)}')
    known = [p for p in inspect.signature(TYPES[kind]).parameters if p not in ('name', 'config')]
    unknown = sorted(set(settings) - set(known))
    if unknown:  # a misspelt setting would otherwise be a TypeError from deep in the call
      raise ValueError(f'config.evals.{name}.{unknown[0]}: not a setting of a {kind} evaluator '
                       f'(its settings: type, {", ".join(known)})')
    out[name] = TYPES[kind](name, config, **settings)
  return out


class Context:
  """What evaluators read, each thing computed once: the features of a split (all the
  combinations any of them asks for) and, for fine-tuning, the model and its parameters."""

  def __init__(self, extractor, params, split, combos, train_products):
    self.extractor, self.params, self.split = extractor, params, split
    self.combos, self.train_products = combos, train_products
    self._cache = {}

  def features(self, split=None) -> features.SplitFeatures:
    """The evaluated split's features, or the train split's sample ('train')."""
    split = split or self.split
    if split not in self._cache:
      limit = self.train_products if split == 'train' else 0
      self._cache[split] = self.extractor(self.params, split, self.combos, limit)
    return self._cache[split]


def evaluate(evaluators: dict, extractor, params, split: str) -> dict:
  """{evaluator name: {combination: {metric: value}}} of every evaluator, on `split`."""
  config = extractor.config
  combos = []
  for e in evaluators.values():
    combos += [c for c in e.combinations if c not in combos]
  context = Context(extractor, params, split, combos, config.eval.train_products)
  return {name: e(context) for name, e in evaluators.items()}


def flat(results: dict, prefix: str = 'eval') -> dict:
  """{'eval/coarse/text+image/mAP@1': value, ...}: what metrics.jsonl and TensorBoard get."""
  return {f'{prefix}/{name}/{combo}/{metric}': value
          for name, rows in results.items() for combo, metrics in rows.items()
          for metric, value in metrics.items()}


def to_json(value, **kwargs) -> str:
  """JSON text of results or of a metrics row, with an undefined metric (NaN) as null: Python's
  json would write NaN, which strict parsers (JavaScript's, Go's, jq's before 1.7) refuse."""
  def finite(v):
    if isinstance(v, dict):
      return {k: finite(x) for k, x in v.items()}
    return None if isinstance(v, float) and math.isnan(v) else v
  return json.dumps(finite(value), allow_nan=False, **kwargs)


def from_json(text: str):
  """Results written by to_json, with NaN back for each undefined metric."""
  return json.loads(text, object_hook=lambda d: {k: math.nan if v is None else v
                                                 for k, v in d.items()})


def tables(results_by_model: dict, evaluators: dict) -> str:
  """Paper-style Markdown tables, one per evaluator: a row per (combination, model), metrics in
  % (counts as they are; n/a for an undefined one). results_by_model: {'pretrained (step N)':
  results, 'random init': ...}."""
  out = []
  for name, e in evaluators.items():
    rows = [(combo, model, metrics) for combo in e.combination_names()
            for model, results in results_by_model.items()
            for metrics in [results[name].get(combo)] if metrics is not None]
    if not rows:
      continue
    columns = list(rows[0][2])
    out.append(f'### {name}: {e.describe()}\n')
    out.append('| modalities | model | ' + ' | '.join(columns) + ' |')
    out.append('|---|---|' + '---|' * len(columns))
    for combo, model, metrics in rows:
      cells = [f'{v:d}' if isinstance(v, int) else 'n/a' if math.isnan(v) else f'{100 * v:.2f}'
               for v in metrics.values()]
      out.append(f'| {combo} | {model} | ' + ' | '.join(cells) + ' |')
    out.append('')
  return '\n'.join(out)
