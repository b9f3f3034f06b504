r"""Evaluates a run's checkpoint on the paper's downstream tasks, over modality combinations.

    python -m scale_jax.evaluate --workdir RUN [--step N] [--evals coarse,fine] [--random-init]

Reads the run's own config (RUN/config.json) unless --config FILE is given; --config.x=y
overrides apply on top. Runs the evaluators of config.evals (docs/evaluation.md: coarse- and
fine-grained retrieval, linear probe and fine-tuning, k-means clustering) on the test split, one
row per modality combination of config.eval.combinations; --random-init adds the same model at
random initialisation as a baseline row. Writes RUN/eval/step_N.json and RUN/eval/step_N.md (the
tables) and prints the tables. An evaluation of another split, or of some evaluators only, writes
files of its own (step_N_validation.md, step_N_coarse+fine.md), never over the full one.
"""
import jax
from absl import flags
from etils import epath

from scale_jax import cli, config_check, evaluators, run_config, sharding, state
from scale_jax.data import build, pipeline
from scale_jax.evaluators import features

_STEP = flags.DEFINE_integer('step', None, 'checkpoint step to evaluate (default: the latest)')
_EVALS = flags.DEFINE_list('evals', None, 'evaluators of config.evals to run (default: all)')
_RANDOM_INIT = flags.DEFINE_bool('random-init', False,
                                 'also evaluate the model at random initialisation (seed '
                                 'config.seed), a baseline row')
_SPLIT = flags.DEFINE_string('split', 'test', 'split to evaluate on (the trainer uses validation)')


def evaluate(config, workdir, step=None, names=None, random_init=False, split='test') -> dict:
  """{'pretrained (step N)': {evaluator: {combination: {metric: value}}}, and 'random init'
  likewise if asked}. Process 0 writes RUN/eval/<results_name(...)>.json and .md."""
  mesh = sharding.make_mesh(config.mesh)
  config_check.check(config, mesh)
  have = pipeline.splits(config.data.dir)
  if split not in have:  # before the checkpoint is read
    hint = ' (rebuild it with --val-fraction 0.05 for one)' if split == 'validation' else ''
    raise config_check.ConfigError(f'--split={split}: {config.data.dir} has no such split, only '
                                   f'{", ".join(have)}{hint}')
  run_config.check_tokenizer(workdir, build.tokenizer_path(config.data.dir))
  params, step = state.restore_params(config, workdir, mesh, step)
  model = state.build_model(config, mesh)
  extractor = features.FeatureExtractor(model, config, mesh)
  chosen = evaluators.from_config(config, names)
  results = {f'pretrained (step {step})': evaluators.evaluate(chosen, extractor, params, split)}
  if random_init:
    tx, _ = state.make_optimizer(config)
    init, _ = state.sharded_state_init(model, tx, config, mesh)
    random_params = init(jax.random.key(config.seed)).params
    results['random init'] = evaluators.evaluate(chosen, extractor, random_params, split)
  if jax.process_index() == 0:  # RUN may be local or gs://
    out = epath.Path(workdir) / 'eval'
    out.mkdir(parents=True, exist_ok=True)
    stem = results_name(step, split, names)
    (out / f'{stem}.json').write_text(evaluators.to_json(results, indent=1))
    (out / f'{stem}.md').write_text(report(results, chosen, split, config))
  return results


def results_name(step: int, split: str = 'test', names=None) -> str:
  """step_N for every evaluator on the test split; the split and the evaluators are named
  otherwise, so that no partial evaluation replaces the full one."""
  return (f'step_{step}' + ('' if split == 'test' else f'_{split}')
          + (f'_{"+".join(names)}' if names else ''))


def report(results, chosen, split, config) -> str:
  e = config.eval
  return (f'# Evaluation on the {split} split\n\nProduct feature: {e.feature} vectors, '
          f'{e.pooling}-pooled over each combination\'s modalities, protocol "{e.protocol}" '
          f'(docs/evaluation.md). Metrics in %.\n\n' + evaluators.tables(results, chosen))


def main(config, workdir):
  results = evaluate(config, workdir, _STEP.value, _EVALS.value, _RANDOM_INIT.value, _SPLIT.value)
  if jax.process_index() == 0:
    print(report(results, evaluators.from_config(config, _EVALS.value), _SPLIT.value, config))


if __name__ == '__main__':
  cli.run(main)
