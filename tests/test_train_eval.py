"""The trainer and the evaluator end to end on the tiny config and 4 devices."""
import copy
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from scale_jax import cli, evaluate, modalities, run_config
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
  config.eval.every = 2
  config.profile.update(start=1, steps=1)
  train(config, workdir)
  config.total_steps = 4
  config.eval.every = 0
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
  assert [r['step'] for r in eval_rows] == [2]
  assert set(eval_rows[0]) == {'step', 'eval/mAP@1', 'eval/mAP@5', 'eval/mAP@10', 'eval/probe_acc'}
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
  subprocess.run([sys.executable, '-m', 'scale_jax.evaluate', '--workdir', workdir,
                  '--config.eval.probe_steps=20'], check=True, capture_output=True, text=True)
  with open(os.path.join(workdir, 'eval.json'), encoding='utf-8') as f:
    results = json.load(f)
  assert list(results) == ['random init', 'pretrained (step 4)']
  for metrics in results.values():
    assert set(metrics) == {'mAP@1', 'mAP@5', 'mAP@10', 'probe acc'}
    assert all(0.0 <= v <= 1.0 for v in metrics.values())
  assert results['random init'] != results['pretrained (step 4)']
  assert 'mAP@10' in evaluate.format_table(results)


def test_a_config_that_does_not_fit_the_checkpoint_names_the_field(trained):
  config, workdir, _ = trained
  other = copy.deepcopy(config)
  other.loss.mrm = 0.0  # no MRM head: another parameter tree than the checkpoint's
  with pytest.raises(ValueError) as e:
    evaluate.evaluate(other, workdir)
  message = str(e.value)
  assert 'patch_heads_image' in message and 'loss.mrm: 1.0 -> 0.0' in message
  assert 'leave out --config' in message


def test_retrieval_map_by_hand():
  # Query 0's neighbours by similarity: 2 (same label), 1 (other), 3 (same).
  features = np.array([[1.0, 0.0], [0.6, 0.8], [0.9, 0.436], [0.0, 1.0]])
  labels = np.array([0, 1, 0, 0])
  sims = features @ features.T
  np.fill_diagonal(sims, -np.inf)
  assert list(np.argsort(-sims[0])) == [2, 1, 3, 0]
  got = evaluate.retrieval_map(features, labels, ks=(1, 3))
  # Query 0: hits at ranks 1 and 3 -> AP@3 = (1/1 + 2/3) / 2; AP@1 = 1.
  ap0_3 = (1 + 2 / 3) / 2
  ranks = [list(np.argsort(-sims[q])) for q in range(4)]
  ap = []
  for q in range(4):
    rel = [labels[j] == labels[q] for j in ranks[q][:3]]
    hits = [sum(rel[:i + 1]) / (i + 1) for i in range(3) if rel[i]]
    ap.append(np.mean(hits) if hits else 0.0)
  assert ap[0] == pytest.approx(ap0_3)
  assert got['mAP@3'] == pytest.approx(np.mean(ap))
  assert got['mAP@1'] == pytest.approx(np.mean([labels[r[0]] == labels[q]
                                                for q, r in enumerate(ranks)]))


def test_linear_probe_separates_separable_data():
  rng = np.random.default_rng(0)
  centres = rng.normal(size=(3, 8)) * 3
  y = rng.integers(0, 3, 300)
  x = centres[y] + rng.normal(size=(300, 8))
  acc = evaluate.linear_probe(x[:200], y[:200], x[200:], y[200:], steps=200, lr=0.05)
  assert acc > 0.9
  shuffled = evaluate.linear_probe(x[:200], rng.permutation(y[:200]), x[200:], y[200:], 200, 0.05)
  assert shuffled < 0.6
