r"""The ablation study of SCALE's claims (M5Product, CVPR 2022) on a controlled catalogue: every
study trains its variants for a few seeds at one fixed budget and evaluates them alike.

    python -m scale_jax.experiments.ablations [--out ablations] [--seeds 3] [--only ladder,mem]
        [--data DIR] [--noisy-data DIR] [--noise-modality image] [--config configs/ablation.py]
        [--results docs/results.md]

Studies (the paper's claims):
  pretraining  pretrained against random init;
  ladder       text, +image, +table, +video, +audio: separately trained models, each evaluated on
               all of its modalities (every added modality helps);
  clip         SCALE with all five against a two-tower CLIP (text+image, no fusion, no masked
               objectives, no weighting), both evaluated on text+image features;
  weighting    harmonized against uniform against no weighting, trained and evaluated on the same
               catalogue with one modality replaced by noise; and the mean weight the noisy
               modality receives over training;
  incomplete   training on every product against complete products only;
  mem          whole-entity masking of the table (MEM) against sub-word masking.
Without --data, the project's generator writes the catalogue (and, for the weighting study, the
same products with --noise-modality replaced by noise) and builds it under OUT. Each run lives in
OUT/runs/<hash of its config>: a run whose evaluation is there is not run again, so an interrupted
study resumes and a changed one reruns only what changed; runs that two studies share (SCALE with
all five, seed s) are trained once. Writes the tables, the plots (next to the results file) and a
reading of each claim to --results, keeping whatever follows its notes marker.
"""
import argparse
import dataclasses
import hashlib
import importlib.util
import json
import os
import platform
import time

import numpy as np
import tqdm

from scale_jax import modalities, run_config
from scale_jax.data.raw import RawDataError

# The metric each study reports per evaluator of configs/ablation.py.
HEADLINE = (('coarse', 'mAP@1'), ('across', 'mAP@1'), ('fine', 'mAP@1'), ('probe', 'accuracy'),
            ('clustering', 'NMI'))
# Everything after this line in the results file is the reader's own and kept by a rerun.
NOTES = '<!-- notes: everything below is kept when the study is rerun -->'

CLIP = {'modalities': ('text', 'image'), 'model.joint_layers': 0, 'model.type_embedding': False,
        'model.weighting': 'none', 'loss.mlm': 0.0, 'loss.mrm': 0.0}
# The paper's order of adding modalities; each run lists its modalities in the registry's order,
# so the last rung is the same config (and the same cached run) as SCALE with all five.
LADDER = tuple((f'+{added[-1]}' if len(added) > 1 else added[0],
                tuple(m for m in ('text', 'table', 'image', 'video', 'audio') if m in added))
               for added in (('text',), ('text', 'image'), ('text', 'image', 'table'),
                             ('text', 'image', 'table', 'video'),
                             ('text', 'image', 'table', 'video', 'audio')))


@dataclasses.dataclass(frozen=True)
class Study:
  claim: str
  runs: tuple  # (label, {dotted config field: value}), the first one the reference
  combination: str = 'all'  # the features compared: 'all' (each run's modalities) or 'text+image'
  noisy: bool = False  # trained and evaluated on the catalogue with one modality as noise
  random_init: bool = False  # adds each run's random initialisation as a row
  ladder: bool = False  # each run is compared with the one before it, not with the first


STUDIES = {
    'pretraining': Study('pretraining helps on every task', (('SCALE', {}),), random_init=True),
    'ladder': Study('every added modality helps',
                    tuple((label, {'modalities': ms}) for label, ms in LADDER), ladder=True),
    'clip': Study('SCALE beats a two-tower CLIP on image+text',
                  (('SCALE (all five)', {}), ('CLIP (text+image)', CLIP)), 'text+image'),
    'weighting': Study('self-harmonized weights help when modalities differ in quality',
                       (('harmonized', {}), ('uniform', {'model.weighting': 'uniform'}),
                        ('none', {'model.weighting': 'none'})), noisy=True),
    'incomplete': Study('training with incomplete products beats complete products only',
                        (('incomplete products', {}),
                         ('complete only', {'data.complete_only': True}))),
    'mem': Study('whole-entity MEM beats sub-word masking of the table',
                 (('whole-entity MEM', {}), ('sub-word masking', {'table.mask_unit': 'token'}))),
}


def load_config(spec: str):
  """'configs/ablation.py' or 'configs/ablation.py:tiny' (get_config's argument)."""
  path, _, arg = spec.partition(':')
  module_spec = importlib.util.spec_from_file_location('ablation_config', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def with_overrides(base, overrides, seed, data_dir):
  config = run_config.with_overrides(base, overrides)
  config.seed, config.data.dir = seed, data_dir
  return config


def run_key(config) -> str:
  """The cache key of a run: its config without `mesh`, whose layout changes no result (the
  losses match across meshes: tests/test_activation_sharding.py) and which gains fields as the
  pod support grows."""
  fields = json.loads(config.to_json(sort_keys=True))
  fields.pop('mesh', None)
  return hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]


def run(config, workdir, random_init) -> dict:
  """Trains (unless done) and evaluates (unless done) one run; its evaluation results."""
  # pylint: disable=g-import-not-at-top  (JAX and the data stack load only when a run starts)
  from scale_jax import evaluate, evaluators
  from scale_jax.train import train
  path = os.path.join(workdir, 'eval', f'step_{config.total_steps}.json')
  if os.path.exists(path):
    with open(path, encoding='utf-8') as f:
      results = evaluators.from_json(f.read())
    if not random_init or 'random init' in results:
      return results
  train(config, workdir)
  return evaluate.evaluate(config, workdir, random_init=random_init)


def prepare_data(args, kinds=('clean', 'noisy')) -> dict:
  """{kind: DIR} for the kinds the studies need ('clean', 'noisy'): given, or generated and
  built under OUT."""
  from scale_jax.data import build, synthetic  # pylint: disable=g-import-not-at-top
  dirs = {}
  for kind, given, noise in (('clean', args.data, None), ('noisy', args.noisy_data,
                                                          args.noise_modality)):
    if kind not in kinds:
      continue
    if given:
      dirs[kind] = given
      continue
    root = os.path.join(args.out, f'{kind}_catalogue')
    data = os.path.join(root, 'data')
    if kind == 'noisy' and args.data:  # the studies would compare different catalogues
      print(f'note: --data is given but --noisy-data is not: the studies on noisy data train on '
            f'the synthetic catalogue in {root}', flush=True)
    if not os.path.exists(build.report_path(data)):
      synthetic.write_catalogue(os.path.join(root, 'raw'), args.num_products, args.data_seed,
                                noise_modality=noise)
      build.build(os.path.join(root, 'raw'), data, val_fraction=0.05)
    dirs[kind] = data
  return dirs


def headline(results, row, combination) -> dict:
  """{'coarse mAP@1': ..., 'probe accuracy': ..., 'clustering NMI': ...} of one row."""
  return {f'{name} {metric}': results[row][name][combination][metric]
          for name, metric in HEADLINE if combination in results[row].get(name, {})}


def noisy_weight(workdir, modality) -> list:
  """[(step, mean weight of the pairs with the noisy modality, mean weight of the other
  pairs)] over training, from metrics.jsonl (the batch means the trainer logs)."""
  out = []
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    for row in map(json.loads, f):
      pairs = {k[len('weights/'):]: v for k, v in row.items() if k.startswith('weights/')}
      off = {k: v for k, v in pairs.items() if len(set(k.split('-'))) == 2}
      if not off:
        continue
      noisy = [v for k, v in off.items() if modality in k.split('-')]
      other = [v for k, v in off.items() if modality not in k.split('-')]
      out.append((row['step'], float(np.mean(noisy)), float(np.mean(other)) if other else 0.0))
  return out


def flatness(workdir) -> float:
  """Relative change of the loss over the last quarter of training (is the budget enough?)."""
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    losses = [(r['step'], r['loss']) for r in map(json.loads, f) if 'loss' in r]
  last_step = losses[-1][0]
  quarter = min(losses, key=lambda s: abs(s[0] - 0.75 * last_step))[1]
  return abs(losses[-1][1] - quarter) / max(abs(quarter), 1e-9)


def summarise(values) -> str:
  values = np.asarray(values, float) * 100
  return f'{values.mean():.2f} ± {values.std():.2f}' if len(values) > 1 else f'{values[0]:.2f}'


# --noise-modality: a modality's name or its manifest field (the generator's word) -> the modality.
NOISE_CHOICES = {name: m for m in modalities.MODALITIES for name in (m, modalities.get(m).field)}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', default='ablations', help='runs, catalogues and plots')
  parser.add_argument('--config', default='configs/ablation.py', help='base config[:arg]')
  parser.add_argument('--seeds', type=int, default=3)
  parser.add_argument('--only', default='', help='comma-separated studies (default: all)')
  parser.add_argument('--data', default='', help='a built dataset (default: the generator\'s)')
  parser.add_argument('--noisy-data', default='', help='the same products, one modality noise')
  parser.add_argument('--noise-modality', default='image', choices=sorted(NOISE_CHOICES),
                      help='the modality the generator replaces by noise (its name or its '
                           'manifest field)')
  parser.add_argument('--num-products', type=int, default=3000)
  parser.add_argument('--data-seed', type=int, default=0)
  parser.add_argument('--results', default='docs/results.md')
  args = parser.parse_args(argv)
  chosen = args.only.split(',') if args.only else list(STUDIES)
  if unknown := [n for n in chosen if n not in STUDIES]:
    parser.error(f'--only: no study {", ".join(unknown)}; the studies: {", ".join(STUDIES)}')
  if args.seeds < 1:
    parser.error(f'--seeds={args.seeds}: at least 1')
  studies = {n: STUDIES[n] for n in chosen}
  base = load_config(args.config)
  noisy_name = NOISE_CHOICES[args.noise_modality]
  args.noise_modality = modalities.get(noisy_name).field  # the generator takes the field
  start = time.time()
  try:
    data = prepare_data(args, {'noisy' if study.noisy else 'clean' for study in studies.values()})
  except RawDataError as e:  # a catalogue too small for its splits, say: what to change
    raise SystemExit(f'error: {e}') from None

  # Every (study, run, seed), and the unique trainings behind them.
  plan, unique = [], {}
  for name, study in studies.items():
    for label, overrides in study.runs:
      for seed in range(args.seeds):
        config = with_overrides(base, overrides, seed, data['noisy' if study.noisy else 'clean'])
        key = run_key(config)
        plan.append((name, label, seed, key))
        unique.setdefault(key, [config, False])[1] |= study.random_init
  results = {}
  print(f'{len(plan)} runs in {len(studies)} studies, {len(unique)} to train and evaluate; budget '
        f'per run {base.total_steps} steps x batch {base.batch_size} = '
        f'{base.total_steps * base.batch_size} products', flush=True)
  cached = sum(os.path.exists(os.path.join(args.out, 'runs', k, 'eval')) for k in unique)
  for key, (config, random_init) in tqdm.tqdm(unique.items(), desc='ablation runs', unit='run'):
    results[key] = run(config, os.path.join(args.out, 'runs', key), random_init)
  report = write_report(args, studies, plan, unique, results, noisy_name, time.time() - start,
                        cached)
  print(report)


def write_report(args, studies, plan, unique, results, noisy_name, seconds, cached=0) -> str:
  """docs/results.md: per study a table of mean ± std over seeds, a plot, and the claim's reading."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  from scale_jax.evaluators import features  # pylint: disable=g-import-not-at-top

  figures = os.path.join(os.path.dirname(os.path.abspath(args.results)), 'results')
  os.makedirs(figures, exist_ok=True)
  base = next(iter(unique.values()))[0]
  flat = {k: flatness(os.path.join(args.out, 'runs', k)) for k in unique}
  lines = [
      '# Ablations: SCALE\'s claims on a controlled catalogue', '',
      f'Written by `python -m scale_jax.experiments.ablations {" ".join(_argv(args))}` on '
      f'{_machine()}, {time.strftime("%Y-%m-%d")}, in {seconds / 60:.0f} min'
      + (f' ({cached} of the {len(unique)} runs were there already and not timed again)'
         if cached else '') + '. Every run: '
      f'{base.total_steps} steps x batch {base.batch_size}, seeds 0..{args.seeds - 1}; the '
      f'loss changed by at most {100 * max(flat.values()):.1f}% over the last quarter of any '
      f'run (median {100 * np.median(list(flat.values())):.1f}%). Test split; mean ± std over '
      f'seeds, in %. Columns: coarse = retrieval, same category relevant; across = the same '
      f'with the other listings of the query\'s own product left out of its gallery; fine = '
      f'retrieval, same product relevant; probe = linear-probe accuracy; clustering = k-means '
      f'NMI.', '']
  for name, study in studies.items():
    rows = {}  # label -> {metric: [values over seeds]}
    for study_name, label, seed, key in plan:
      if study_name != name:
        continue
      config = unique[key][0]
      combination = features.name(features.combinations(config, [study.combination])[0])
      model_rows = [(label, next(r for r in results[key] if r.startswith('pretrained')))]
      if study.random_init:
        model_rows.append((f'{label}, random init', 'random init'))
      for row_label, row in model_rows:
        for metric, value in headline(results[key], row, combination).items():
          rows.setdefault(row_label, {}).setdefault(metric, []).append(value)
    metrics = list(next(iter(rows.values())))
    lines += [f'## {name}: {study.claim}', '',
              'Features compared: ' + ('each run\'s own modalities' if study.combination == 'all'
                                       else study.combination) + (
                  f'; trained and evaluated with {noisy_name} replaced by noise'
                  if study.noisy else '') + '.', '',
              '| run | ' + ' | '.join(metrics) + ' |', '|---|' + '---|' * len(metrics)]
    for label, values in rows.items():
      lines.append(f'| {label} | ' + ' | '.join(summarise(values[m]) for m in metrics) + ' |')
    lines += ['', f'![{name}](results/{name}.png)', '', _reading(rows, metrics, study.ladder), '']
    _bar_plot(plt, rows, metrics, f'{name}: {study.claim}', os.path.join(figures, f'{name}.png'))
    if study.noisy:
      lines += _weights_plot(plt, args, plan, name, noisy_name, figures)
  lines += _loss_plot(plt, args, plan, figures)
  notes = ''
  if os.path.exists(args.results):
    with open(args.results, encoding='utf-8') as f:
      notes = f.read().partition(NOTES)[2]
  text = '\n'.join(lines) + '\n' + NOTES + (notes or '\n')
  with open(args.results, 'w', encoding='utf-8') as f:
    f.write(text)
  return text


def _reading(rows, metrics, ladder=False) -> str:
  """Whether the claim's row beats the row it is compared with, on each metric, and by how much
  against the spread over seeds (the two rows' standard deviations added): the first row
  against each other one, or (a ladder) each row against the one before it."""
  labels = list(rows)
  pairs = (list(zip(labels[1:], labels[:-1])) if ladder
           else [(labels[0], other) for other in labels[1:]])
  out = []
  for first, other in pairs:
    for m in metrics:
      a, b = np.asarray(rows[first][m]) * 100, np.asarray(rows[other][m]) * 100
      diff, spread = a.mean() - b.mean(), a.std() + b.std()
      if min(len(a), len(b)) < 2:
        verdict = 'not judged (one seed has no spread to judge by; run --seeds 2 or more)'
      else:
        verdict = ('held' if diff > spread else 'reversed' if diff < -spread
                   else 'not shown (within the spread over seeds)')
      out.append(f'- {m}: {first} {a.mean():.2f} vs {other} {b.mean():.2f} ({diff:+.2f}): '
                 f'{verdict}')
  return '\n'.join(['Reading:', ''] + out) if out else ''


def _bar_plot(plt, rows, metrics, title, path):
  fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.2), squeeze=False)
  labels = list(rows)
  for ax, m in zip(axes[0], metrics):
    values = [100 * np.asarray(rows[label][m]) for label in labels]
    ax.bar(range(len(labels)), [v.mean() for v in values], yerr=[v.std() for v in values],
           capsize=3)
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha='right', fontsize=7)
    ax.set_title(m, fontsize=9)
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _weights_plot(plt, args, plan, name, noisy_name, figures) -> list:
  fig, ax = plt.subplots(figsize=(6, 3.2))
  lines = ['Mean self-harmonized weight of the pairs with the noisy modality, over training '
           '(batch means, seed 0):', '']
  for study_name, label, seed, key in plan:
    if study_name != name or seed != 0:
      continue
    curve = noisy_weight(os.path.join(args.out, 'runs', key), noisy_name)
    steps, noisy, other = zip(*curve)
    ax.plot(steps, noisy, label=f'{label}: pairs with {noisy_name}')
    ax.plot(steps, other, '--', label=f'{label}: other pairs')
    lines.append(f'- {label}: {noisy[-1]:.3f} with {noisy_name} against {other[-1]:.3f} for the '
                 f'other pairs at the last step')
  ax.set_xlabel('step')
  ax.set_ylabel('mean weight')
  ax.legend(fontsize=6)
  fig.tight_layout()
  fig.savefig(os.path.join(figures, f'{name}_weights.png'), dpi=110)
  plt.close(fig)
  return lines + ['', f'![{name} weights](results/{name}_weights.png)', '']


def _loss_plot(plt, args, plan, figures) -> list:
  """The training loss of every run at seed 0: has the budget flattened the losses?"""
  fig, ax = plt.subplots(figsize=(6, 3.2))
  seen = set()
  for study_name, label, seed, key in plan:
    if seed != 0 or key in seen:
      continue
    seen.add(key)
    with open(os.path.join(args.out, 'runs', key, 'metrics.jsonl'), encoding='utf-8') as f:
      steps, losses = zip(*[(r['step'], r['loss']) for r in map(json.loads, f) if 'loss' in r])
    ax.plot(steps, losses, label=f'{study_name}: {label}', linewidth=1)
  ax.set_xlabel('step')
  ax.set_ylabel('training loss')
  ax.legend(fontsize=5, ncol=2)
  fig.tight_layout()
  fig.savefig(os.path.join(figures, 'losses.png'), dpi=110)
  plt.close(fig)
  return ['## Training losses (seed 0)', '', '![losses](results/losses.png)', '']


def _argv(args) -> list:
  return [f'--{k.replace("_", "-")}={v}' for k, v in vars(args).items() if v not in ('', None)]


def _machine() -> str:
  try:
    with open('/proc/cpuinfo', encoding='utf-8') as f:
      model = next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
  except (OSError, StopIteration):
    model = platform.processor() or 'unknown CPU'
  return f'{model}, {os.cpu_count()} cores'


if __name__ == '__main__':
  main()
