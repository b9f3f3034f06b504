"""One home per modality: its kind, token count, preprocessing, masks, masked objective and head
FLOPs live in `scale_jax/modalities/<name>.py`; the pipeline, the model, the losses and model_info
ask them instead of branching on names. Adding a modality is one new file here (a subclass of
TokenModality or PatchModality), its entry in REGISTRY, and its config section.

Numpy only (decoders are imported by the methods that decode), so the model can import this
without the data stack.
"""
import numpy as np

from scale_jax.modalities.audio import AUDIO
from scale_jax.modalities.base import SPECIAL_IDS, Modality, PatchModality, TokenModality
from scale_jax.modalities.image import IMAGE
from scale_jax.modalities.table import TABLE
from scale_jax.modalities.text import TEXT
from scale_jax.modalities.video import VIDEO

# In the fixed order of every array with a modality axis (presence masks, harmonized weight
# matrices, the joint token sequence) and of the stored `present` fields.
REGISTRY = {m.name: m for m in (TEXT, TABLE, IMAGE, VIDEO, AUDIO)}
MODALITIES = tuple(REGISTRY)


def get(name: str) -> Modality:
  return REGISTRY[name]


def active(config) -> tuple:
  """The modalities a config trains on (`config.modalities`), checked and in canonical order."""
  chosen = tuple(config.modalities)
  unknown = set(chosen) - set(MODALITIES)
  if unknown or not chosen:
    raise ValueError(f'config.modalities={chosen}: choose from {MODALITIES}')
  return tuple(m for m in MODALITIES if m in chosen)


def masked(config) -> tuple:
  """The active modalities whose masked objective is on: a non-zero coefficient in config.loss
  and a non-zero mask rate. Only these are masked (and corrupted) and get a head; the others are
  seen clean."""
  return tuple(m for m in active(config)
               if config.loss[REGISTRY[m].objective] and config[m]['mask_rate'] > 0)


def token_counts(config) -> dict:
  """Encoder tokens per active modality, the global token included."""
  return {m: REGISTRY[m].num_tokens(config[m]) for m in active(config)}


def dummy_batch(config, batch_size: int, train: bool = True) -> dict:
  """A batch of zeros with the shapes and dtypes of the pipeline's (model init, compilation)."""
  spec, names, masked_ones = {}, active(config), masked(config)
  for m in names:
    spec.update(REGISTRY[m].batch_spec(config[m], train, m in masked_ones))
  spec.update(present=((len(names),), np.bool_), label=((), np.int32), instance=((), np.int32))
  return {k: np.zeros((batch_size,) + shape, dtype) for k, (shape, dtype) in spec.items()}


def random_batch(config, batch_size: int, rng: np.random.Generator) -> dict:
  """dummy_batch's shapes with random content: every modality present, 15% of the positions of
  the masked modalities masked, within their max_masked (benchmarks and tests that need no
  dataset)."""
  batch = dummy_batch(config, batch_size)
  for k, v in batch.items():
    if k.endswith('_input') and v.dtype == np.float32:
      batch[k] = rng.normal(size=v.shape).astype(np.float32)
    elif k.endswith(('_input', '_target')):
      batch[k] = rng.integers(len(SPECIAL_IDS), config.model.vocab_size, v.shape).astype(np.int32)
    elif k.endswith('_valid') or k == 'present':
      batch[k] = np.ones(v.shape, bool)
    elif k.endswith('_masked'):
      m = k[:-len('_masked')]
      batch[k] = np.stack([REGISTRY[m].limit_masked(row, rng, config[m])
                           for row in rng.random(v.shape) < 0.15])
  return batch
