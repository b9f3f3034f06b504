"""Evaluators by name over modality combinations: the features of each protocol, the rows and
tables they report, and fine-tuning against the linear probe."""
import json
import subprocess
import sys
import unicodedata

import jax
import numpy as np
import pytest

from configs import tiny
from scale_jax import evaluators, sharding, state
from scale_jax.data import build, pipeline
from scale_jax.evaluators import features, retrieval


@pytest.fixture(scope='module')
def setup(data_dir):
  config = tiny.get_config()
  config.data.dir = data_dir
  config.eval.combinations = ('text', 'image', 'text+image', 'all')
  mesh = sharding.make_mesh(config.mesh)
  model = state.build_model(config)
  tx, _ = state.make_optimizer(config)
  init, _ = state.sharded_state_init(model, tx, config, mesh)
  params = init(jax.random.key(0)).params
  return config, mesh, model, params


def _extract(setup, split='test', **eval_fields):
  config, mesh, model, params = setup
  config = config.copy_and_resolve_references()
  config.eval.update(eval_fields)
  extractor = features.FeatureExtractor(model, config, mesh)
  return extractor(params, split, features.combinations(config))


def test_combinations_follow_the_runs_modalities(setup, caplog):
  config = setup[0].copy_and_resolve_references()
  names = [features.name(c) for c in features.combinations(config)]
  assert names == ['text', 'image', 'text+image', 'text+table+image+video+audio']
  config.modalities = ('text', 'image')
  assert [features.name(c) for c in features.combinations(config)] == [
      'text', 'image', 'text+image']  # 'all' is now text+image: no duplicate row
  assert [features.name(c) for c in features.combinations(config, ['text+audio', 'text'])] == [
      'text']
  assert ("combinations text+audio left out: config.modalities=('text', 'image') does not have "
          "all of their modalities" in caplog.text)
  with pytest.raises(ValueError, match="'txt'"):
    features.combinations(config, ['txt+image'])
  with pytest.raises(ValueError, match=r"none of the combinations \('text\+audio', 'audio'\) "
                                       r"can be formed from config.modalities=\('text', 'image'\)"):
    features.combinations(config, ['text+audio', 'audio'])


def test_features_of_each_protocol(setup):
  only = _extract(setup, protocol='only')
  full = _extract(setup, protocol='full')
  present, _ = build.load_presence(setup[0].data.dir, 'test')
  np.testing.assert_array_equal(only.has['image'], present[only.rows, 2])
  np.testing.assert_array_equal(only.has['text+image'], present[only.rows][:, [0, 2]].any(1))
  every = 'text+table+image+video+audio'
  np.testing.assert_allclose(only.features[every], full.features[every], atol=1e-5)
  # A fused text vector computed from all modalities has seen the others; from text alone not.
  both = only.has['text'] & present[only.rows, 2]
  assert np.abs(only.features['text'][both] - full.features['text'][both]).max() > 1e-3
  # The pre-fusion embeddings z of one modality never see the others: the protocols agree.
  z_only, z_full = _extract(setup, protocol='only', feature='z'), _extract(
      setup, protocol='full', feature='z')
  np.testing.assert_allclose(z_only.features['text'], z_full.features['text'], atol=1e-5)
  summed = _extract(setup, pooling='sum')
  norms = np.linalg.norm(summed.features['text+image'], axis=1, keepdims=True)
  has = summed.has['text+image']
  np.testing.assert_allclose(summed.features['text+image'][has] / norms[has],
                             only.features['text+image'][has], atol=1e-5)
  assert not summed.features['text+image'][~has].any()


def test_evaluators_by_name_report_a_row_per_combination(setup):
  config, mesh, model, params = setup
  chosen = evaluators.from_config(config, ['coarse', 'fine', 'probe', 'clustering'])
  extractor = features.FeatureExtractor(model, config, mesh)
  results = evaluators.evaluate(chosen, extractor, params, 'test')
  rows = ['text', 'image', 'text+image', 'text+table+image+video+audio']
  for name in chosen:
    assert list(results[name]) == rows
  assert set(results['coarse']['text']) == {'mAP@1', 'mAP@5', 'mAP@10', 'Prec@1', 'Prec@5',
                                            'Prec@10', 'queries'}
  assert results['coarse']['text']['mAP@1'] == results['coarse']['text']['Prec@1']
  assert set(results['clustering']['image']) == {'NMI', 'purity', 'products'}
  assert 0 <= results['probe']['text+image']['accuracy'] <= 1
  flat = evaluators.flat(results)
  assert flat['eval/fine/text+image/mAP@5'] == results['fine']['text+image']['mAP@5']
  table = evaluators.tables({'pretrained': results, 'random init': results}, chosen)
  assert table.count('| text+image | pretrained |') == 4
  assert '### coarse: coarse-grained retrieval' in table
  undefined = {'fine': {'text': retrieval.retrieval_metrics(np.zeros((2, 10), bool), [0, 0])}}
  assert ('| text | pretrained | n/a | n/a | n/a | n/a | n/a | n/a | 0 |'
          in evaluators.tables({'pretrained': undefined}, {'fine': chosen['fine']}))
  with pytest.raises(ValueError, match="no evaluator 'nope'"):
    evaluators.from_config(config, ['nope'])


def test_a_combination_no_product_has_is_undefined_not_scored(setup):
  """A catalogue without any image: its rows are NaN (n/a) with a count of 0, not a 0% or a 100%
  from fitting or clustering nothing; the other rows are scored as ever."""
  config = setup[0]
  split = {s: _extract(setup, s) for s in ('test', 'train')}
  for f in split.values():
    f.has['image'] = np.zeros_like(f.has['image'])

  class Context:
    def features(self, which=None):
      return split[which or 'test']

  chosen = evaluators.from_config(config, ['coarse', 'probe', 'clustering'])
  results = {name: e(Context()) for name, e in chosen.items()}
  for name, rows in results.items():
    counts = {k: v for k, v in rows['image'].items() if isinstance(v, int)}
    assert list(counts.values()) == [0], (name, rows['image'])
    assert all(np.isnan(v) for k, v in rows['image'].items() if k not in counts), name
    assert all(np.isfinite(v) for v in rows['text'].values()), name
  # Written as strict JSON (null, not NaN, which JavaScript's and Go's parsers refuse), read back
  # with NaN in its place.
  text = evaluators.to_json(results)
  strict = json.loads(text, parse_constant=lambda c: pytest.fail(f'{c} in the results JSON'))
  assert strict['coarse']['image']['mAP@1'] is None and strict['coarse']['image']['queries'] == 0
  back = evaluators.from_json(text)
  assert np.isnan(back['clustering']['image']['NMI'])
  assert back['coarse']['text'] == results['coarse']['text']


def test_unseen_categories_and_a_product_per_cluster_are_warned_about(setup, caplog):
  config = setup[0]
  split = {s: _extract(setup, s) for s in ('test', 'train')}
  test, train = split['test'], split['train']
  gone = test.labels[test.has['text']][0]
  train.has['text'] = train.has['text'] & (train.labels != gone)  # no train product of it
  one_each = [np.flatnonzero(test.has['image'] & (test.labels == c))[0]
              for c in np.unique(test.labels[test.has['image']])[:3]]
  test.has['image'] = np.isin(np.arange(len(test.labels)), one_each)

  class Context:
    def features(self, which=None):
      return split[which or 'test']

  chosen = evaluators.from_config(config, ['probe', 'clustering'])
  for e in chosen.values():
    e(Context())
  unseen = int(np.sum(test.has['text'] & (test.labels == gone)))
  assert (f'probe, text: {unseen} of {test.has["text"].sum()} test products are of a category no '
          'train product of the combination has' in caplog.text)
  assert 'clustering, image: k-means with k = 3 categories for 3 products' in caplog.text
  assert 'clustering, text:' not in caplog.text


def test_finetuning_beats_the_linear_probe_on_random_features(setup):
  """At random initialisation frozen features are poor; training the encoders with the head
  on the train split learns the categories."""
  config, mesh, model, params = setup
  config = config.copy_and_resolve_references()
  config.eval.combinations = ('all',)
  config.evals.finetune.update(steps=20, lr=1e-3)
  config.evals.probe.steps = 200
  chosen = evaluators.from_config(config, ['probe', 'finetune'])
  results = evaluators.evaluate(chosen, features.FeatureExtractor(model, config, mesh), params,
                                'test')
  every = 'text+table+image+video+audio'
  assert results['finetune'][every]['accuracy'] > results['probe'][every]['accuracy'] + 0.1


def test_no_module_imports_the_trainer():
  """`python -m scale_jax.train` runs train.py as __main__: a module it imports that imported
  scale_jax.train again would execute the file twice (two TrainState classes)."""
  code = ('import sys; import scale_jax.cli, scale_jax.config_check, scale_jax.evaluate, '
          'scale_jax.evaluators, scale_jax.losses, scale_jax.model_info, scale_jax.run_config, '
          'scale_jax.sharding, scale_jax.state, scale_jax.data.pipeline; '
          'print("scale_jax.train" in sys.modules)')
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == 'False'


def test_query_and_gallery_lists_restrict_retrieval(setup, tmp_path):
  config, mesh, model, params = setup
  config = config.copy_and_resolve_references()
  config.eval.combinations = ('text',)
  extractor = features.FeatureExtractor(model, config, mesh)
  coarse = lambda: evaluators.evaluate(evaluators.from_config(config, ['coarse']), extractor,
                                       params, 'test')['coarse']['text']
  everyone = coarse()
  f = extractor(params, 'test', features.combinations(config))
  ids = pipeline.item_ids(config, 'test', f.rows[f.has['text']])
  (tmp_path / 'five.txt').write_text('\n'.join(ids[:5]) + '\n')
  assert everyone['queries'] > 5
  config.evals.coarse.queries = str(tmp_path / 'five.txt')  # only these five ask
  assert 0 < coarse()['queries'] <= 5
  config.evals.coarse.update(queries='', gallery=str(tmp_path / 'five.txt'))  # only they answer
  assert coarse()['queries'] < everyone['queries']


def test_id_lists_are_read_when_the_evaluator_is_built(setup, tmp_path, caplog):
  config, mesh, model, params = setup
  config = config.copy_and_resolve_references()
  config.eval.combinations = ('text',)
  extractor = features.FeatureExtractor(model, config, mesh)
  f = extractor(params, 'test', features.combinations(config))
  ids = pipeline.item_ids(config, 'test', f.rows[f.has['text']])
  config.evals.coarse.queries = str(tmp_path / 'missing.txt')
  with pytest.raises(ValueError, match=r'config.evals.coarse.queries=.*missing.txt.*cannot read'):
    evaluators.from_config(config, ['coarse'])  # before any feature is computed
  (tmp_path / 'empty.txt').write_text('\n \n')
  config.evals.coarse.queries = str(tmp_path / 'empty.txt')
  with pytest.raises(ValueError, match='lists no item id'):
    evaluators.from_config(config, ['coarse'])
  # A byte order mark (Windows editors write one) is not part of the first id.
  (tmp_path / 'bom.txt').write_text('\ufeff' + ids[0] + '\nnot-an-item\n', encoding='utf-8')
  config.evals.coarse.queries = str(tmp_path / 'bom.txt')
  coarse = evaluators.from_config(config, ['coarse'])
  assert coarse['coarse'].id_lists['queries'] == {ids[0], 'not-an-item'}
  rows = evaluators.evaluate(coarse, extractor, params, 'test')['coarse']['text']
  assert rows['queries'] <= 1
  assert 'config.evals.coarse.queries: 1 of its 2 item ids are not in the test split' in caplog.text
  # A listed id is read as the manifest's was (NFC, whitespace collapsed, HTML references): the
  # build stores "A&B café" for the manifest's "A&amp;B  café" in NFD, and the list names it so.
  listed = 'A&amp;B  ' + unicodedata.normalize('NFD', 'café') + ' \t'
  (tmp_path / 'typed.txt').write_text(f'{listed}\n{ids[1]}\n', encoding='utf-8')
  config.evals.coarse.queries = str(tmp_path / 'typed.txt')
  assert evaluators.from_config(config, ['coarse'])['coarse'].id_lists['queries'] == {
      'A&B caf\u00e9', ids[1]}


def test_a_misspelt_evaluator_setting_is_named(setup):
  config = setup[0].copy_and_resolve_references()
  config.evals.coarse.relevence = 'instance'
  with pytest.raises(ValueError, match=r'config.evals.coarse.relevence: not a setting of a '
                                       r'retrieval evaluator \(its settings: type, relevance, '):
    evaluators.from_config(config, ['coarse'])
