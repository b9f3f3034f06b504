"""The Grain input pipeline: TFDS array_record -> fixed-shape numpy batches of the config's
modalities (`config.modalities`; only those are read and decoded).

Per modality m (its preprocessing and masks are `scale_jax.modalities.<m>`'s) a batch holds
  {m}_input   tokens (int32 [B, L]) or patches/frames/features (float32 [B, N, P]); tokens already
              corrupted for MLM/MEM, patches clean (the model swaps masked ones for a learned
              embedding);
  {m}_valid   bool [B, L]: real positions (not padding);
  {m}_masked  bool [B, L]: positions the masked objective predicts (training batches, and only
              for modalities whose objective is on: `modalities.masked(config)`);
  {m}_target  int32 [B, L]: the original tokens (masked token modalities, training batches);
plus `present` bool [B, M] (the config's modalities, in MODALITIES order), `label` and
`instance` int32 [B]. Products that carry none of the config's modalities are left out (counted
and logged).

Everything here is numpy: it runs in Grain worker processes, which must not touch JAX devices.
"""
import dataclasses
import os
import zlib

import grain
import numpy as np
import tensorflow_datasets as tfds
from absl import flags, logging
from etils import epath

from scale_jax import modalities
from scale_jax.data import build, media, tokenizer


def _built(data_dir: str, path: str) -> str:
  """`path`, a file or folder a build writes into data_dir; FileNotFoundError saying what to
  run if it is not there (data_dir a raw catalogue, say)."""
  if not epath.Path(path).exists():
    raw_here = epath.Path(data_dir, 'manifest.jsonl').exists()
    raise FileNotFoundError(
        f'{data_dir}: ' + ('a raw catalogue, not a built dataset' if raw_here else
                           f'no dataset built here (no {path})') + '; build one with `python -m '
        f'scale_jax.data.build --raw {data_dir if raw_here else "RAW_DIR"} --out DATA` and give '
        f'--config.data.dir=DATA')
  return path


def open_split(data_dir: str, split: str):
  """Random-access source over one split of a dataset written by scale_jax.data.build."""
  dataset = _built(data_dir, build.dataset_dir(data_dir))
  return tfds.builder_from_directory(dataset).as_data_source(split=split)


def splits(data_dir: str) -> tuple:
  """The splits a dataset has (the validation split is optional)."""
  dataset = _built(data_dir, build.dataset_dir(data_dir))
  return tuple(tfds.builder_from_directory(dataset).info.splits)


def vocab_size(data_dir: str) -> int:
  path = _built(data_dir, build.tokenizer_path(data_dir))
  return tokenizer.load_tokenizer(path).vocab_size()


def _item_id(ex) -> str:
  item_id = ex['item_id']
  return item_id.decode('utf-8') if isinstance(item_id, bytes) else str(item_id)


def _stored_presence(ex, spec, c):
  """Whether the product has this modality in the form the config reads (media or features)."""
  i = modalities.MODALITIES.index(spec.name)
  return bool(np.asarray(ex[spec.presence_field(c)])[i])


@dataclasses.dataclass(frozen=True)
class Preprocess(grain.transforms.Map):
  """Decodes one stored example into the fixed-shape arrays of the module docstring, for the
  config's modalities only. `cfg` is the plain-dict form of the config (picklable for workers)."""
  cfg: dict

  def map(self, ex):
    out = {'label': np.int32(ex['label']), 'instance': np.int32(ex['instance_id']),
           # Seeds this product's masks (see Mask); dropped before batches leave the pipeline.
           'product_key': np.uint32(zlib.crc32(_item_id(ex).encode('utf-8')))}
    present = []
    for m in self.cfg['modalities']:
      spec, c = modalities.get(m), self.cfg[m]
      is_present = _stored_presence(ex, spec, c)
      try:
        arrays = spec.preprocess(ex, is_present, c)
      except media.MediaError as e:  # the build decoded it once; a run of days must not die here
        logging.warning('product %s: %s; %s treated as absent', _item_id(ex), e, m)
        is_present, arrays = False, spec.preprocess(ex, False, c)
      present.append(is_present)
      out.update(arrays)
    out['present'] = np.array(present)
    return out


class Rows:
  """The rows `indices` of a random-access source, as a random-access source."""

  def __init__(self, source, indices):
    self.source, self.indices = source, np.asarray(indices)

  def __len__(self):
    return len(self.indices)

  def __getitem__(self, index):
    return self.source[int(self.indices[index])]


def usable_rows(config, split: str, complete: bool = False, training: bool = False) -> np.ndarray:
  """Indices of the split's products that carry at least one of the config's modalities (with
  `complete`, all of them), in the form the config reads; the others are logged and left out.
  A config modality no product has is logged too, as what it means for `training` or not."""
  stored = dict(zip(('present', 'features_present'), build.load_presence(config.data.dir, split)))
  names = modalities.active(config)
  columns = np.stack([stored[modalities.get(m).presence_field(config[m])]
                      [:, modalities.MODALITIES.index(m)] for m in names], 1)
  has = columns.all(1) if complete else columns.any(1)
  if not has.all():
    logging.warning('%s split: left out %d of %d products that have %s of %s', split,
                    int((~has).sum()), len(has), 'not all' if complete else 'none',
                    ', '.join(names))
  if not has.any():
    raise ValueError(f'{config.data.dir}: no {split} product has '
                     + (f'all of config.modalities={names} (config.data.complete_only=True)'
                        if complete else f'any of config.modalities={names}'))
  for m, column in zip(names, columns.T):
    if not column.any():  # e.g. source='features' on a catalogue that brought none
      form = (f' in the form config.{m}.source={config[m].source!r} reads'
              if 'source' in config[m] else '')
      meaning = ('its encoder and losses learn nothing; leave it out of config.modalities'
                 if training else 'evaluation rows that need it are n/a')
      logging.warning('%s split: no product has %s%s: %s', split, m, form, meaning)
  return np.flatnonzero(has)


class DecodedSource:
  """The split's records decoded by Preprocess, as a random-access source for Grain.

  Keeps up to `cache_bytes` of decoded products in memory, by record: decoding has no randomness
  (the masks are drawn afterwards), so every epoch after the first skips reading and decoding
  what fits. A catalogue far larger than memory simply runs uncached past the budget. Each Grain
  worker process fills a cache of its own (it pickles empty).
  """

  def __init__(self, source, preprocess: Preprocess, cache_bytes: int = 0):
    self.source, self.preprocess, self.cache_bytes = source, preprocess, cache_bytes
    self._cache, self._cached_bytes = {}, 0

  def __len__(self):
    return len(self.source)

  def __getitem__(self, index):
    ex = self._cache.get(index)
    if ex is not None:
      return ex
    ex = {k: np.asarray(v) for k, v in self.preprocess.map(self.source[index]).items()}
    size = sum(v.nbytes for v in ex.values())
    if self._cached_bytes + size <= self.cache_bytes:
      for v in ex.values():
        v.flags.writeable = False  # shared by every later epoch: Mask and batching only copy
      self._cache[index] = ex
      self._cached_bytes += size  # read threads may overshoot a little: a budget, not a limit
    return ex

  def __getstate__(self):
    return {'source': self.source, 'preprocess': self.preprocess, 'cache_bytes': self.cache_bytes}

  def __setstate__(self, state):
    self.__init__(**state)


@dataclasses.dataclass(frozen=True)
class Mask(grain.transforms.MapWithIndex):
  """Draws the masks of the masked objectives from (seed, product, epoch) alone.

  Applied to the endless stream of shuffled epochs, where `index // epoch_length` is the epoch.
  The masks of a product do not depend on where the shuffle put it nor on how many processes
  share the stream, so a multi-host run sees the masks of a single-host one, and they change
  from epoch to epoch. Only the modalities in cfg['masked'] are masked; masked tokens are
  corrupted with replacements drawn from `replacement_ids` (the tokenizer's own pieces).
  """
  cfg: dict
  replacement_ids: np.ndarray = dataclasses.field(compare=False)
  seed: int
  epoch_length: int

  def map_with_index(self, index, ex):
    ex = dict(ex)
    epoch = index // self.epoch_length
    rng = np.random.default_rng([self.seed, int(ex.pop('product_key')), epoch])
    return self.draw(ex, rng)

  def draw(self, ex, rng):
    """Adds `{m}_masked` (and corrupts token inputs, keeping `{m}_target`) for each masked
    modality; drops what only the masks needed."""
    for m in self.cfg['masked']:
      spec = modalities.get(m)
      masked = spec.limit_masked(spec.draw_mask(ex, rng, self.cfg[m]), rng, self.cfg[m])
      ex[f'{m}_masked'] = masked
      if spec.discrete:
        ex[f'{m}_target'] = ex[f'{m}_input']
        ex[f'{m}_input'] = spec.corrupt(ex[f'{m}_input'], masked, rng, self.replacement_ids)
    return _drop_mask_keys(ex, self.cfg['modalities'])


def _drop_mask_keys(ex, names):
  for m in names:
    for key in modalities.get(m).mask_keys:
      ex.pop(key, None)
  return ex


def _plain(config) -> dict:
  """What Preprocess and Mask read of the config, as plain dicts (picklable for workers)."""
  names = modalities.active(config)
  return {'modalities': names, 'masked': modalities.masked(config),
          **{m: dict(config[m]) for m in names}}


def check_feature_sizes(config, split: str, rows: np.ndarray) -> None:
  """Decodes one product's features per features-mode modality, so that a wrong
  config.{m}.feature_dim stops the run here, naming the field, not in a Grain worker after
  compiling: the build gives every product's features of a modality one size."""
  _, features_present = build.load_presence(config.data.dir, split)
  source, cfg = None, _plain(config)
  for m in modalities.active(config):
    spec = modalities.get(m)
    if not spec.reads_features(cfg[m]):
      continue
    having = rows[features_present[rows, modalities.MODALITIES.index(m)]]
    if len(having):
      if source is None:
        source = open_split(config.data.dir, split)
      spec.preprocess(source[int(having[0])], True, cfg[m])  # raises for another size


def _read_options(config, batch_size):
  """Threads and read-ahead; config.data.prefetch counts examples, Grain's buffer elements."""
  threads = config.data.read_threads
  return grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(
      threads, -(-config.data.prefetch // batch_size)))  # fewer than threads would idle some


def num_workers(config) -> int:
  """config.data.num_workers, with -1 (auto) leaving most cores to the train step."""
  workers = config.data.num_workers
  return max(0, (os.cpu_count() or 1) // 4) if workers < 0 else workers


def train_dataset(config, process_index: int = 0, process_count: int = 1,
                  start_step: int = 0) -> grain.IterDataset:
  """Endless shuffled training batches from global batch `start_step` on: this process's share,
  batch_size / process_count rows.

  One global stream for all processes: the whole split decoded (cached up to data.cache_mb),
  shuffled (reshuffled every epoch), masks drawn, cut into global batches. Process p reads rows
  [p * b, (p + 1) * b) of each global batch (b = batch_size / process_count) and decodes only
  those, so shares are disjoint, together cover the split, and the global batch is the same for
  any number of processes. So the position of a resumed run follows from its step and the
  global batch size alone, whatever number of processes saved it (elastic resume).
  """
  if config.batch_size % process_count:
    raise ValueError(f'batch_size {config.batch_size} does not split over {process_count} '
                     'processes')
  local_batch = config.batch_size // process_count
  rows = usable_rows(config, 'train', complete=config.data.complete_only, training=True)
  if config.batch_size > len(rows):
    raise ValueError(
        f'config.batch_size={config.batch_size} is more than the {len(rows)} train products of '
        f'{config.data.dir}: every batch would hold copies of a product, which the contrastive '
        f'losses take for negatives of each other; give a batch_size of at most {len(rows)}')
  check_feature_sizes(config, 'train', rows)
  source = Rows(open_split(config.data.dir, 'train'), rows)
  cfg = _plain(config)
  decoded = DecodedSource(source, Preprocess(cfg), config.data.cache_mb << 20)
  ds = grain.MapDataset.source(decoded).shuffle(seed=config.seed).repeat()
  replacements = tokenizer.replacement_ids(tokenizer.load_tokenizer(
      build.tokenizer_path(config.data.dir)))
  ds = ds.map_with_index(Mask(cfg, replacements, config.seed, len(source)))
  ds = ds.batch(local_batch, drop_remainder=True)[process_index::process_count][start_step:]
  ds = ds.to_iter_dataset(_read_options(config, local_batch))
  if workers := num_workers(config):
    if not flags.FLAGS.is_parsed():  # Grain's workers read absl flags; notebooks and tests
      flags.FLAGS.mark_as_parsed()  # never parse them, so take the defaults
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
  return ds


def eval_rows(config, split: str, max_products: int = 0, seed: int = 0) -> np.ndarray:
  """The records of a split that evaluation reads, in record order: the usable ones (see
  usable_rows), or a seeded sample of max_products of them (0: all)."""
  rows = usable_rows(config, split)
  if 0 < max_products < len(rows):
    rows = np.sort(np.random.default_rng(seed).choice(rows, max_products, replace=False))
  return rows


def item_ids(config, split: str, rows) -> list:
  """The item ids of records `rows` of a split (reads the records)."""
  source = open_split(config.data.dir, split)
  return [_item_id(source[int(i)]) for i in rows]


def eval_batches(config, split: str, batch_size: int, rows=None):
  """One pass over a split without masks: yields (batch, number of real examples); the last
  batch is padded to batch_size (padding has present all False) so every batch has one shape.
  `rows`: the records to read, in that order (default: eval_rows(config, split))."""
  cfg = _plain(config)
  rows = eval_rows(config, split) if rows is None else rows
  source = Rows(open_split(config.data.dir, split), rows)
  ds = grain.MapDataset.source(source).map(Preprocess(cfg)).batch(batch_size)
  for batch in ds.to_iter_dataset(_read_options(config, batch_size)):
    batch = _drop_mask_keys(batch, cfg['modalities'])
    batch.pop('product_key')
    n = len(batch['label'])
    if n < batch_size:
      batch = {k: np.concatenate([v, np.zeros((batch_size - n,) + v.shape[1:], v.dtype)])
               for k, v in batch.items()}
    yield batch, n
