"""The ablation study end to end at smoke-test size: two studies, one seed, a few steps."""
import os

import pytest

from scale_jax.experiments import ablations


def test_ablations_write_tables_plots_and_readings(data_dir, tmp_path):
  results = tmp_path / 'docs' / 'results.md'
  argv = ['--out', str(tmp_path / 'ablations'), '--config', 'configs/ablation.py:tiny',
          '--only', 'pretraining,mem', '--seeds', '1', '--data', data_dir,
          '--noisy-data', data_dir, '--results', str(results)]
  ablations.main(argv)
  text = results.read_text(encoding='utf-8')
  assert '## pretraining: pretraining helps on every task' in text
  assert '## mem: whole-entity MEM beats sub-word masking of the table' in text
  for row in ('| SCALE |', '| SCALE, random init |', '| whole-entity MEM |',
              '| sub-word masking |'):
    assert row in text
  assert ('| run | coarse mAP@1 | across mAP@1 | fine mAP@1 | probe accuracy | clustering NMI |'
          in text)
  assert text.count('Reading:') == 2 and '4 steps x batch 8' in text
  assert '- probe accuracy: whole-entity MEM' in text
  # One seed has no spread: no claim is called held or reversed on it.
  assert 'not judged (one seed has no spread' in text
  assert '): held' not in text and '): reversed' not in text
  for png in ('pretraining.png', 'mem.png', 'losses.png'):
    assert os.path.getsize(tmp_path / 'docs' / 'results' / png) > 1000
  # SCALE with all five at seed 0 is both studies' reference: trained once.
  runs = os.listdir(tmp_path / 'ablations' / 'runs')
  assert len(runs) == 2
  mtimes = {r: os.path.getmtime(tmp_path / 'ablations' / 'runs' / r / 'eval') for r in runs}
  with open(results, 'a', encoding='utf-8') as f:
    f.write('A note of the reader.\n')
  ablations.main(argv)  # everything cached: nothing trains or evaluates again
  assert results.read_text(encoding='utf-8').endswith(ablations.NOTES + '\nA note of the reader.\n')
  assert mtimes == {r: os.path.getmtime(tmp_path / 'ablations' / 'runs' / r / 'eval')
                    for r in runs}


@pytest.mark.parametrize('args, message', [
    (['--only', 'pretraining,mme'], '--only: no study mme; the studies: '),
    (['--seeds', '0'], '--seeds=0: at least 1'),
    (['--noise-modality', 'colour'], "invalid choice: 'colour'"),
])
def test_a_wrong_argument_is_named_before_any_work(args, message, tmp_path, capsys):
  with pytest.raises(SystemExit):
    ablations.main(['--out', str(tmp_path / 'nothing')] + args)
  assert message in capsys.readouterr().err
  assert not os.path.exists(tmp_path / 'nothing')


def test_a_catalogue_too_small_for_its_splits_says_what_to_change(tmp_path):
  with pytest.raises(SystemExit, match=r"^error: split '\w+' would be empty: .*give more products"):
    ablations.main(['--out', str(tmp_path / 'small'), '--num-products', '4', '--seeds', '1',
                    '--only', 'pretraining', '--noise-modality', 'text'])
