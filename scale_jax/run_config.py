r"""A run remembers its config: `train` writes the resolved config to RUN/config.json at its start,
and evaluation, the notebook and init_from read it from there.

    python -m scale_jax.evaluate --workdir RUN            # the run's own config
    python -m scale_jax.evaluate --workdir RUN --config.eval.batch_size=64

Without --config, the command line loads RUN/config.json through this file (as
`--config=scale_jax/run_config.py:RUN`), so --config.x=y overrides still apply.
"""
import json
import os

import ml_collections

FILENAME = 'config.json'


def path(workdir: str) -> str:
  return os.path.join(workdir, FILENAME)


def save(config, workdir: str) -> None:
  os.makedirs(workdir, exist_ok=True)
  with open(path(workdir), 'w', encoding='utf-8') as f:
    f.write(config.to_json(indent=1, sort_keys=True))
    f.write('\n')


def load(workdir: str) -> ml_collections.ConfigDict:
  """RUN/config.json as a ConfigDict (tuples come back as lists)."""
  if not os.path.isfile(path(workdir)):
    raise FileNotFoundError(f'{path(workdir)}: no saved config; this run was not started by '
                            f'`python -m scale_jax.train` of this version. Give --config FILE '
                            f'with the overrides it was trained with.')
  with open(path(workdir), encoding='utf-8') as f:
    return ml_collections.ConfigDict(json.load(f))


def get_config(workdir: str) -> ml_collections.ConfigDict:
  """The config_flags entry point: `--config=scale_jax/run_config.py:RUN`."""
  return load(workdir)


def _flat(config, prefix=''):
  """{'model.width': 128, ...} with JSON values (tuples as lists)."""
  out = {}
  for key, value in json.loads(config.to_json()).items():
    if isinstance(value, dict):
      out.update(_flat(ml_collections.ConfigDict(value), f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = value
  return out


def differences(saved, current) -> list:
  """'field: saved value -> current value' for every field where the two configs differ."""
  a, b = _flat(saved), _flat(current)
  missing = object()
  return [f'{k}: {a.get(k, "(none)")!r} -> {b.get(k, "(none)")!r}'
          for k in sorted(set(a) | set(b)) if a.get(k, missing) != b.get(k, missing)]
