"""The trainer, the evaluation command and the Colab notebook end to end on the tiny config and
4 devices."""
import copy
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from scale_jax import cli, config_check, evaluate, modalities, run_config
from scale_jax.data import pipeline
from scale_jax.evaluators import features
from scale_jax.train import train


@pytest.fixture(scope='module')
def trained(data_dir, tmp_path_factory):
  """A tiny run of 2 steps (evaluated at step 2, step 1 profiled), then resumed to 4 (the second
  call must pick up at step 2)."""
  from configs import tiny
  config = tiny.get_config()
  config.data.dir = data_dir
  config.mesh.update(data=2, fsdp=2)
  workdir = str(tmp_path_factory.mktemp('run'))
  config.total_steps = 2
  config.evals.coarse.every = 2
  config.profile.update(start=1, steps=1)
  train(config, workdir)
  config.total_steps = 4
  config.evals.coarse.every = 0
  config.profile.steps = 0
  state = train(config, workdir)
  return config, workdir, state


def test_metrics_and_checkpoints(trained):
  config, workdir, state = trained
  assert int(state.step) == 4
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    rows = [json.loads(line) for line in f]
  train_rows = [r for r in rows if 'loss' in r]
  assert [r['step'] for r in train_rows] == [1, 2, 3, 4]  # resumed at 3, nothing repeated
  for r in train_rows:
    for key in ('loss', 'contrastive', 'grad_norm', 'lr', 'examples_per_sec', 'data_wait',
                'mfu', 'weights/text-image',
                *(modalities.get(m).objective for m in modalities.MODALITIES)):
      assert np.isfinite(r[key]), key
  eval_rows = [r for r in rows if 'loss' not in r]
  assert [r['step'] for r in eval_rows] == [2]  # evals.coarse.every=2, on the validation split
  combos = [features.name(c) for c in features.combinations(config)]
  assert set(eval_rows[0]) == {'step'} | {
      f'eval/coarse/{c}/{m}' for c in combos
      for m in ('mAP@1', 'mAP@5', 'mAP@10', 'Prec@1', 'Prec@5', 'Prec@10', 'queries')}
  validation = pipeline.usable_rows(config, 'validation')
  assert eval_rows[0]['eval/coarse/text+table+image+video+audio/queries'] <= len(validation)
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['2', '4']
  assert any(f.startswith('events') for f in os.listdir(os.path.join(workdir, 'tensorboard')))
  traces = [f for _, _, files in os.walk(os.path.join(workdir, 'tensorboard', 'plugins', 'profile'))
            for f in files if f.endswith('.xplane.pb')]
  assert traces  # the profiler trace of step 1


def test_evaluate_reads_the_runs_own_config(trained):
  """`python -m scale_jax.evaluate --workdir RUN`: no --config, the run's RUN/config.json (here
  with the mesh the run was trained on), and overrides on top of it."""
  config, workdir, _ = trained
  assert run_config.differences(run_config.load(workdir), config) == []
  assert cli.with_saved_config(['evaluate', '--workdir', workdir]) == [
      'evaluate', f'--config={run_config.__file__}:{workdir}', '--workdir', workdir]
  full = os.path.join(workdir, 'eval', 'step_4.json')
  os.makedirs(os.path.dirname(full), exist_ok=True)
  with open(full, 'w', encoding='utf-8') as f:
    f.write('{"a full evaluation": {}}')
  subprocess.run([sys.executable, '-m', 'scale_jax.evaluate', '--workdir', workdir,
                  '--random-init', '--evals=coarse,probe,finetune', '--config.evals.probe.steps=20',
                  '--config.evals.finetune.steps=2', "--config.eval.combinations=('text', 'all')"],
                 check=True, capture_output=True, text=True)
  with open(full, encoding='utf-8') as f:
    assert f.read() == '{"a full evaluation": {}}'  # some evaluators only: files of their own
  with open(os.path.join(workdir, 'eval', 'step_4_coarse+probe+finetune.json'),
            encoding='utf-8') as f:
    results = json.load(f)
  assert list(results) == ['pretrained (step 4)', 'random init']
  every = 'text+table+image+video+audio'
  for rows in results.values():
    assert list(rows) == ['coarse', 'probe', 'finetune']
    assert list(rows['coarse']) == list(rows['probe']) == ['text', every]
    assert list(rows['finetune']) == [every]  # its own combinations: ('all',)
    assert 0 <= rows['probe']['text']['accuracy'] <= 1
  assert results['random init'] != results['pretrained (step 4)']
  with open(os.path.join(workdir, 'eval', 'step_4_coarse+probe+finetune.md'),
            encoding='utf-8') as f:
    table = f.read()
  assert '| text | random init |' in table and f'| {every} | pretrained (step 4) |' in table


def test_a_config_that_does_not_fit_the_checkpoint_names_the_field(trained):
  config, workdir, _ = trained
  other = copy.deepcopy(config)
  other.loss.mrm = 0.0  # no MRM head: another parameter tree than the checkpoint's
  with pytest.raises(ValueError) as e:
    evaluate.evaluate(other, workdir)
  message = str(e.value)
  assert 'patch_heads_image' in message and 'loss.mrm: 1.0 -> 0.0' in message
  assert 'leave out --config' in message


def test_evaluating_a_split_the_dataset_lacks_says_which_it_has(trained):
  config, workdir, _ = trained
  with pytest.raises(config_check.ConfigError, match=f'^--split=val: {config.data.dir} has no '
                                                      'such split, only train, validation, test$'):
    evaluate.evaluate(config, workdir, split='val')


def test_a_dataset_with_another_tokenizer_is_refused(trained, tmp_path):
  """A rebuild from other products (here: a tokenizer trained on other text) would give the
  run's token ids other meanings: resuming and evaluating on it are refused."""
  from scale_jax.data import build, tokenizer
  config, workdir, _ = trained
  kept = os.path.join(workdir, run_config.TOKENIZER)
  with open(kept, 'rb') as a, open(build.tokenizer_path(config.data.dir), 'rb') as b:
    assert a.read() == b.read()
  other = tmp_path / 'data'
  shutil.copytree(config.data.dir, other)
  tokenizer.train_tokenizer([f'other words {i} in another catalogue' for i in range(200)],
                            build.tokenizer_path(str(other)), 300)
  config = copy.deepcopy(config)
  config.data.dir = str(other)
  message = f'{build.tokenizer_path(str(other))} is not the tokenizer {workdir} was trained with'
  with pytest.raises(ValueError, match=message):
    evaluate.evaluate(config, workdir)
  config.total_steps = 6
  with pytest.raises(ValueError, match=message):
    train(config, workdir)


NOTEBOOK = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'notebooks',
                        'evaluate_checkpoint.ipynb')


@pytest.mark.parametrize('damage', ['state deleted', 'data file truncated'])
def test_a_damaged_checkpoint_is_named_with_the_way_on(trained, tmp_path, damage):
  """Resuming or evaluating a run whose latest checkpoint is damaged says which checkpoint, why,
  and how to go on from the one before (Orbax alone: a KeyError, or hundreds of lines of
  asynchronous traceback)."""
  from scale_jax import sharding
  from scale_jax import state as run_state
  config, workdir, _ = trained
  run = str(tmp_path / 'run')
  shutil.copytree(workdir, run)
  state_dir = os.path.join(run, 'checkpoints', '4', 'state')
  if damage == 'state deleted':
    shutil.rmtree(state_dir)
  else:
    for directory, _, names in os.walk(state_dir):
      for name in names if os.path.basename(directory) == 'd' else ():  # the array data
        with open(os.path.join(directory, name), 'r+b') as f:
          f.truncate(os.path.getsize(f.name) // 2)
  expected = r'checkpoint 4 in .* cannot be read \(.*\); .* resume from step 2, .* --step 2'
  mesh = sharding.make_mesh(config.mesh)
  with pytest.raises(run_state.UnreadableCheckpoint, match=expected):
    run_state.restore_params(config, run, mesh)
  params, step = run_state.restore_params(config, run, mesh, step=2)
  assert step == 2 and params
  longer = copy.deepcopy(config)
  longer.total_steps = 6
  with pytest.raises(run_state.UnreadableCheckpoint, match=expected):
    train(longer, run)


def test_notebook_runs_and_draws(trained, monkeypatch, tmp_path):
  """The Colab notebook, executed headless on the tiny run: its tables and figures."""
  import nbclient  # pylint: disable=g-import-not-at-top  (test extras)
  import nbformat  # pylint: disable=g-import-not-at-top
  _, workdir, _ = trained
  monkeypatch.setenv('SCALE_JAX_WORKDIR', workdir)
  monkeypatch.setenv('SCALE_JAX_SOURCE', '')  # installed already
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  nbclient.NotebookClient(notebook, timeout=600, kernel_name='python3',
                          resources={'metadata': {'path': str(tmp_path)}}).execute()
  outputs = [o for cell in notebook.cells if cell.cell_type == 'code' for o in cell.outputs]
  assert not [o for o in outputs if o.output_type == 'error']
  tables = ''.join(o.data.get('text/markdown', '') for o in outputs if 'data' in o)
  for evaluator in ('coarse', 'fine', 'probe', 'finetune', 'clustering'):
    assert f'### {evaluator}:' in tables
  for combo in ('text', 'image', 'text+image', 'text+table+image+video+audio'):
    assert f'| {combo} | random init |' in tables and f'| {combo} | pretrained (step 4) |' in tables
  figures = [o for o in outputs if 'data' in o and 'image/png' in o.data]
  assert len(figures) == 5  # metrics, weights heatmap, PCA, retrieval examples, training curves
  with open(os.path.join(workdir, 'eval', 'step_4.json'), encoding='utf-8') as f:
    assert list(json.load(f)) == ['pretrained (step 4)', 'random init']
