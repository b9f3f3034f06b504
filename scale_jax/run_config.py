r"""A run remembers its config: `train` writes the resolved config to RUN/config.json at its start,
and evaluation, the notebook and init_from read it from there. It keeps its tokenizer too
(RUN/tokenizer.model), so that a resume or an evaluation on a rebuilt dataset is refused.

    python -m scale_jax.evaluate --workdir RUN            # the run's own config
    python -m scale_jax.evaluate --workdir RUN --config.eval.batch_size=64

Without --config, the command line loads RUN/config.json through this file (as
`--config=scale_jax/run_config.py:RUN`), so --config.x=y overrides still apply. RUN may be a local
directory or a gs:// URL (etils epath, as Orbax and TFDS use).
"""
import json

import ml_collections
from etils import epath

FILENAME = 'config.json'
TOKENIZER = 'tokenizer.model'  # a copy of the one the run started with


def path(workdir: str) -> epath.Path:
  return epath.Path(workdir) / FILENAME


def save(config, workdir: str) -> None:
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  path(workdir).write_text(config.to_json(indent=1, sort_keys=True) + '\n')


def save_tokenizer(workdir: str, tokenizer_path: str) -> None:
  """Keeps a copy of the tokenizer a run starts with (RUN/tokenizer.model): its token ids mean
  that tokenizer's word pieces, and no other."""
  kept = epath.Path(workdir) / TOKENIZER
  if not kept.exists():
    kept.write_bytes(epath.Path(tokenizer_path).read_bytes())


def check_tokenizer(workdir: str, tokenizer_path: str) -> None:
  """Raises ValueError if the run kept a tokenizer and `tokenizer_path` is another one (the
  dataset was rebuilt from other products, or config.data.dir names another dataset)."""
  kept = epath.Path(workdir) / TOKENIZER
  if kept.exists() and kept.read_bytes() != epath.Path(tokenizer_path).read_bytes():
    raise ValueError(
        f'{tokenizer_path} is not the tokenizer {workdir} was trained with ({kept}): the run\'s '
        f'token ids would be read as other word pieces. Give --config.data.dir the dataset the '
        f'run was trained on (a rebuild of the same raw catalogue gives the same tokenizer), or '
        f'start a new run')


def with_overrides(config, overrides: dict) -> ml_collections.ConfigDict:
  """A copy of config with each {'a.b': value} set, as --config.a.b=value sets it: an existing
  field only (a misspelt one would otherwise be added, and the run silently unchanged)."""
  config = config.copy_and_resolve_references()
  for key, value in overrides.items():
    *sections, leaf = key.split('.')
    node = config
    for section in sections:
      node = node[section]
    if leaf not in node:
      raise KeyError(f'config override {key!r}: the config has no field {leaf!r}'
                     f'{" in " + ".".join(sections) if sections else ""}; its fields there: '
                     f'{", ".join(sorted(node.keys()))}')
    node[leaf] = value
  return config


def _tuples(value):
  """JSON's lists back to the tuples the configs hold (and --config.x=y can override)."""
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def load(workdir: str) -> ml_collections.ConfigDict:
  """RUN/config.json as a ConfigDict."""
  if not path(workdir).exists():
    raise FileNotFoundError(f'{path(workdir)}: no saved config; this run was not started by '
                            f'`python -m scale_jax.train` of this version. Give --config FILE '
                            f'with the overrides it was trained with.')
  return ml_collections.ConfigDict(_tuples(json.loads(path(workdir).read_text())))


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
