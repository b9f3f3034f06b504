"""The Colab notebook, executed headless on a tiny run trained here: its tables and figures."""
import json
import os

import nbclient
import nbformat
import pytest

from configs import tiny
from scale_jax.train import train

NOTEBOOK = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'notebooks',
                        'evaluate_checkpoint.ipynb')


@pytest.fixture(scope='module')
def run(data_dir, tmp_path_factory):
  config = tiny.get_config()
  config.data.dir = data_dir
  config.eval.combinations = ('text', 'image', 'text+image', 'all')
  config.total_steps = 2
  workdir = str(tmp_path_factory.mktemp('notebook_run'))
  train(config, workdir)
  return workdir


def test_notebook_runs_and_draws(run, monkeypatch, tmp_path):
  monkeypatch.setenv('SCALE_JAX_WORKDIR', run)
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
    assert f'| {combo} | random init |' in tables and f'| {combo} | pretrained (step 2) |' in tables
  figures = [o for o in outputs if 'data' in o and 'image/png' in o.data]
  assert len(figures) == 5  # metrics, weights heatmap, PCA, retrieval examples, training curves
  with open(os.path.join(run, 'eval', 'step_2.json'), encoding='utf-8') as f:
    assert list(json.load(f)) == ['pretrained (step 2)', 'random init']
