"""The Grain input pipeline: TFDS array_record -> fixed-shape numpy batches for all five modalities.

Per modality m a batch holds
  {m}_input   tokens (int32 [B, L]) or patches/frames (float32 [B, N, P]); tokens already corrupted
              for MLM/MEM, patches clean (the model swaps masked ones for a learned embedding);
  {m}_valid   bool [B, L]: real positions (not padding);
  {m}_masked  bool [B, L]: positions the masked objective predicts (training batches only);
  {m}_target  int32 [B, L]: the original tokens (token modalities, training batches only);
plus `present` bool [B, M] (the config's modalities, in MODALITIES order), `label` and
`instance` int32 [B]. Only the config's modalities (`config.modalities`) are read and decoded.
A media modality whose config says `source='features'` reads the product's pre-extracted array
instead of decoding its media: `{m}_input` float32 [B, feature_tokens, feature_dim].

Everything here is numpy: it runs in Grain worker processes, which must not touch JAX devices.
"""
import dataclasses
import functools
import os
import zlib

import grain
import numpy as np
import tensorflow_datasets as tfds
from absl import flags, logging

from scale_jax import MODALITIES, active_modalities
from scale_jax.data import build, media, tokenizer

TOKEN_MODALITIES = ('text', 'table')


def open_split(data_dir: str, split: str):
  """Random-access source over one split of a dataset written by scale_jax.data.build."""
  path = build.dataset_dir(data_dir)
  if not os.path.isdir(path):
    raise FileNotFoundError(
        f'{path}: no dataset here; build one with '
        f'`python -m scale_jax.data.build --raw RAW_DIR --out {data_dir}`')
  return tfds.builder_from_directory(path).as_data_source(split=split)


def vocab_size(data_dir: str) -> int:
  return tokenizer.load_tokenizer(build.tokenizer_path(data_dir)).vocab_size()


def patchify(x: np.ndarray, ph: int, pw: int) -> np.ndarray:
  """[H, W, C] -> [(H/ph) * (W/pw), ph * pw * C], row-major over patches."""
  h, w, c = x.shape
  x = x.reshape(h // ph, ph, w // pw, pw, c).transpose(0, 2, 1, 3, 4)
  return x.reshape((h // ph) * (w // pw), ph * pw * c)


def _pad_tokens(tokens, length):
  out = np.full(length, tokenizer.PAD, np.int32)
  tokens = tokens[:length]
  out[:len(tokens)] = tokens
  return out


def _text(ex, present, c):
  """[CLS] caption [SEP], truncated to the config length."""
  caption = list(ex['caption_tokens'][:c['max_len'] - 2])
  tokens = _pad_tokens([tokenizer.CLS] + caption + [tokenizer.SEP], c['max_len'])
  return {'text_input': tokens, 'text_valid': (tokens != tokenizer.PAD) & present}


def _table(ex, present, c):
  """[CLS] k1 v1 [SEP] k2 v2 [SEP] ..., with each token's entity kept for MEM."""
  tokens = _pad_tokens([tokenizer.CLS] + list(ex['table_tokens']), c['max_len'])
  return {'table_input': tokens, 'table_valid': (tokens != tokenizer.PAD) & present,
          'table_entities': _pad_tokens([0] + list(ex['table_entities']), c['max_len'])}


def _image(ex, present, c):
  """Resized, scaled to [-1, 1], cut into patches."""
  img = np.zeros((c['size'], c['size'], 3), np.float32)
  if present:
    img = media.decode_image(ex['image'], c['size']) * 2 - 1
  patches = patchify(img, c['patch'], c['patch'])
  return {'image_input': patches, 'image_valid': np.full(len(patches), present)}


def _video(ex, present, c):
  """About `fps` frames a second (the paper's one), at most num_frames, each frame a token."""
  frames = np.zeros((c['num_frames'], c['frame_size'], c['frame_size'], 3), np.float32)
  count = 0
  if present:
    frames, count = media.decode_video(ex['video'], c['num_frames'], c['frame_size'], c['fps'])
    frames[:count] = frames[:count] * 2 - 1
  return {'video_input': frames.reshape(c['num_frames'], -1),
          'video_valid': np.arange(c['num_frames']) < count}


def _audio(ex, present, c):
  """Log-mel spectrogram of the first seconds, standardised per clip, cut into time x frequency
  patches."""
  spec = np.zeros((c['frames'], c['n_mels']), np.float32)
  if present:
    data = ex['video'] if ex['audio_in_video'] else ex['audio']  # a video's sound track
    wave = media.decode_audio(data, c['sample_rate'], c['seconds'])
    mel = media.log_mel(wave, c['sample_rate'], c['n_fft'], c['hop'], c['n_mels'])[:c['frames']]
    spec[:len(mel)] = (mel - mel.mean()) / (mel.std() + 1e-5)
  patches = patchify(spec[..., None], c['patch_time'], c['patch_freq'])
  return {'audio_input': patches, 'audio_valid': np.full(len(patches), present)}


def _features(modality, ex, present, c):
  """Pre-extracted features: the first feature_tokens rows of the stored [tokens, dim] array."""
  out = np.zeros((c['feature_tokens'], c['feature_dim']), np.float32)
  count = 0
  if present:
    x = media.decode_features(ex[f'{modality}_features'])[:c['feature_tokens']]
    if x.shape[1] != c['feature_dim']:
      raise ValueError(f'product {_item_id(ex)}: {modality} features have {x.shape[1]} values '
                       f'per token but config.{modality}.feature_dim is {c["feature_dim"]}')
    count = len(x)
    out[:count] = x
  return {f'{modality}_input': out, f'{modality}_valid': np.arange(len(out)) < count}


PREPROCESS = {'text': _text, 'table': _table, 'image': _image, 'video': _video, 'audio': _audio}


def _uses_features(c) -> bool:
  source = c.get('source', 'media')
  if source not in ('media', 'features'):
    raise ValueError(f"a modality's source must be 'media' or 'features', not {source!r}")
  return source == 'features'


def _item_id(ex) -> str:
  item_id = ex['item_id']
  return item_id.decode('utf-8') if isinstance(item_id, bytes) else str(item_id)


@dataclasses.dataclass(frozen=True)
class Preprocess(grain.transforms.Map):
  """Decodes one stored example into the fixed-shape arrays of the module docstring, for the
  config's modalities only. `cfg` is the plain-dict form of the config (picklable for workers)."""
  cfg: dict

  def map(self, ex):
    modalities = self.cfg['modalities']
    media_present = dict(zip(MODALITIES, np.asarray(ex['present'], bool)))
    features_present = dict(zip(MODALITIES, np.asarray(ex['features_present'], bool)))
    out = {'label': np.int32(ex['label']), 'instance': np.int32(ex['instance_id']),
           # Seeds this product's masks (see Mask); dropped before batches leave the pipeline.
           'product_key': np.uint32(zlib.crc32(_item_id(ex).encode('utf-8')))}
    present = []
    for m in modalities:
      c = self.cfg[m]
      if _uses_features(c):
        decode, is_present = functools.partial(_features, m), features_present[m]
      else:
        decode, is_present = PREPROCESS[m], media_present[m]
      try:
        arrays = decode(ex, bool(is_present), c)
      except media.MediaError as e:  # the build decoded it once; a run of days must not die here
        logging.warning('product %s: %s; %s treated as absent', _item_id(ex), e, m)
        is_present, arrays = False, decode(ex, False, c)
      present.append(is_present)
      out.update(arrays)
    out['present'] = np.array(present)
    return out


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
  from epoch to epoch.
  """
  cfg: dict
  vocab_size: int
  seed: int
  epoch_length: int

  def map_with_index(self, index, ex):
    ex = dict(ex)
    epoch = index // self.epoch_length
    rng = np.random.default_rng([self.seed, int(ex.pop('product_key')), epoch])
    return self.draw(ex, rng)

  def draw(self, ex, rng):
    """Adds `{m}_masked` (and corrupts token inputs, keeping `{m}_target`) for each modality."""
    for m in self.cfg['modalities']:
      rate, valid = self.cfg[m]['mask_rate'], ex[f'{m}_valid']
      if m == 'text':  # MLM: 15% of word pieces, never [CLS]/[SEP]
        maskable = valid & (ex['text_input'] != tokenizer.CLS) & (ex['text_input'] != tokenizer.SEP)
        masked = maskable & (rng.random(valid.shape) < rate)
      elif m == 'table':  # MEM: 15% of key/value pairs; all tokens of the key, or of the value
        entities = np.where(valid, ex.pop('table_entities'), 0)
        pairs = np.unique((entities[entities > 0] + 1) // 2)
        chosen = pairs[rng.random(len(pairs)) < rate]
        value_side = rng.random(len(chosen)) < 0.5
        masked = np.isin(entities, 2 * chosen - 1 + value_side)
      else:
        masked = valid & (rng.random(valid.shape) < rate)
      ex[f'{m}_masked'] = masked
      if m in TOKEN_MODALITIES:  # 80% [MASK], 10% a random token, 10% unchanged
        tokens = ex[f'{m}_input']
        ex[f'{m}_target'] = tokens
        u = rng.random(tokens.shape)
        random_tokens = rng.integers(len(tokenizer.SPECIAL_IDS), self.vocab_size, tokens.shape)
        tokens = np.where(masked & (u < 0.8), tokenizer.MASK, tokens)
        ex[f'{m}_input'] = np.where(masked & (u >= 0.8) & (u < 0.9), random_tokens,
                                    tokens).astype(np.int32)
    return ex


def token_counts(config) -> dict:
  """Tokens per modality, the global token included (text and table: [CLS] is the global one)."""
  counts = {
      'text': lambda c: c.max_len, 'table': lambda c: c.max_len,
      'image': lambda c: (c.size // c.patch) ** 2 + 1,
      'video': lambda c: c.num_frames + 1,
      'audio': lambda c: (c.frames // c.patch_time) * (c.n_mels // c.patch_freq) + 1}
  return {m: config[m].feature_tokens + 1 if _uses_features(config[m]) else counts[m](config[m])
          for m in active_modalities(config)}


def patch_dims(config) -> dict:
  """Feature size of one patch/frame of each continuous modality (what MRM/MFP/MAM regress)."""
  dims = {'image': lambda c: c.patch ** 2 * 3, 'video': lambda c: c.frame_size ** 2 * 3,
          'audio': lambda c: c.patch_time * c.patch_freq}
  return {m: config[m].feature_dim if _uses_features(config[m]) else dims[m](config[m])
          for m in active_modalities(config) if m in dims}


def dummy_batch(config, batch_size: int, train: bool = True) -> dict:
  """A batch of zeros with the shapes and dtypes of real ones (model init, AOT compilation)."""
  counts, dims, spec = token_counts(config), patch_dims(config), {}
  for m in active_modalities(config):
    length = counts[m] - (m not in TOKEN_MODALITIES)  # continuous inputs have no global token yet
    if m in TOKEN_MODALITIES:
      spec[f'{m}_input'] = ((length,), np.int32)
      if train:
        spec[f'{m}_target'] = ((length,), np.int32)
    else:
      spec[f'{m}_input'] = ((length, dims[m]), np.float32)
    spec[f'{m}_valid'] = ((length,), np.bool_)
    if train:
      spec[f'{m}_masked'] = ((length,), np.bool_)
  spec.update(present=((len(counts),), np.bool_), label=((), np.int32), instance=((), np.int32))
  return {k: np.zeros((batch_size,) + shape, dtype) for k, (shape, dtype) in spec.items()}


def random_batch(config, batch_size: int, rng: np.random.Generator) -> dict:
  """dummy_batch's shapes with random content: every modality present, 15% of positions masked
  (benchmarks and tests that need no dataset)."""
  batch = dummy_batch(config, batch_size)
  for k, v in batch.items():
    if k.endswith('_input') and v.dtype == np.float32:
      batch[k] = rng.normal(size=v.shape).astype(np.float32)
    elif k.endswith(('_input', '_target')):
      batch[k] = rng.integers(len(tokenizer.SPECIAL_IDS), config.model.vocab_size,
                              v.shape).astype(np.int32)
    elif k.endswith('_valid') or k == 'present':
      batch[k] = np.ones(v.shape, bool)
    elif k.endswith('_masked'):
      batch[k] = rng.random(v.shape) < 0.15
  return batch


def _plain(config) -> dict:
  modalities = active_modalities(config)
  return {'modalities': modalities, **{m: dict(config[m]) for m in modalities}}


def _read_options(config, batch_size):
  """Threads and read-ahead; config.data.prefetch counts examples, Grain's buffer elements."""
  threads = config.data.read_threads
  return grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(
      threads, -(-config.data.prefetch // batch_size)))  # fewer than threads would idle some


def num_workers(config) -> int:
  """config.data.num_workers, with -1 (auto) leaving most cores to the train step."""
  workers = config.data.num_workers
  return max(0, (os.cpu_count() or 1) // 4) if workers < 0 else workers


def train_dataset(config, process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
  """Endless shuffled training batches: this process's share, batch_size / process_count rows.

  One global stream for all processes: the whole split decoded (cached up to data.cache_mb),
  shuffled (reshuffled every epoch), masks drawn, cut into global batches. Process p reads rows
  [p * b, (p + 1) * b) of each global batch (b = batch_size / process_count) and decodes only
  those, so shares are disjoint, together cover the split, and the global batch is the same for
  any number of processes.
  """
  if config.batch_size % process_count:
    raise ValueError(f'batch_size {config.batch_size} does not split over {process_count} '
                     'processes')
  local_batch = config.batch_size // process_count
  source = open_split(config.data.dir, 'train')
  cfg = _plain(config)
  decoded = DecodedSource(source, Preprocess(cfg), config.data.cache_mb << 20)
  ds = grain.MapDataset.source(decoded).shuffle(seed=config.seed).repeat()
  ds = ds.map_with_index(Mask(cfg, config.model.vocab_size, config.seed, len(source)))
  ds = ds.batch(local_batch, drop_remainder=True)[process_index::process_count]
  ds = ds.to_iter_dataset(_read_options(config, local_batch))
  if workers := num_workers(config):
    if not flags.FLAGS.is_parsed():  # Grain's workers read absl flags; notebooks and tests
      flags.FLAGS.mark_as_parsed()  # never parse them, so take the defaults
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
  return ds


def eval_batches(config, split: str, batch_size: int):
  """One pass over a split without masks: yields (batch, number of real examples); the last
  batch is padded to batch_size (padding has present all False) so every batch has one shape."""
  source = open_split(config.data.dir, split)
  ds = grain.MapDataset.source(source).map(Preprocess(_plain(config))).batch(batch_size)
  for batch in ds.to_iter_dataset(_read_options(config, batch_size)):
    for key in ('table_entities', 'product_key'):  # only the masks need them
      batch.pop(key, None)
    n = len(batch['label'])
    if n < batch_size:
      batch = {k: np.concatenate([v, np.zeros((batch_size - n,) + v.shape[1:], v.dtype)])
               for k, v in batch.items()}
    yield batch, n
