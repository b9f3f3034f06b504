r"""Builds the TFDS dataset and the tokenizer from a raw layout.

    python -m scale_jax.data.build --raw DIR_OR_MANIFEST --out DIR [--test-fraction 0.15]
        [--val-fraction 0.05] [--strict] [--workers N]

Writes (to a local OUT; copy it to a bucket afterwards, and runs read it from there, gs:// or
local) OUT/tokenizer.model, OUT/scale_products/1.2.0/ (array_record, splits train, validation and
test), OUT/categories.json (the category names by dense label and the instance count),
OUT/presence.npz (each split's `present` and `features_present`, in record order) and
OUT/build_report.json (every problem found, by kind; the media files many instances share,
shared_media; the manifest's fields nothing reads, unread_fields). Splits go by instance, so no
physical product is in two of them; a split that would be empty stops the build before anything
is written. Labels and instance ids (text or integers in the manifest) are stored as dense
integers.
Media and feature files are checked (decoded once, in worker processes) and stored encoded; the
Grain pipeline decodes them. A broken modality is counted and marked absent, a broken line counted
and skipped; `--strict` stops at the first problem instead, naming the file and the reason.
"""
import argparse
import collections
import io
import json
import multiprocessing
import os
import re
import shutil
import zlib

import numpy as np
import tensorflow_datasets as tfds
import tqdm
from etils import epath

from scale_jax import modalities
from scale_jax.modalities import MODALITIES
from scale_jax.data import media, raw, tokenizer

DATASET_NAME = 'scale_products'
# 1.1.0: features, features_present, audio_in_video. 1.2.0: splits by instance with a validation
# split; label and instance_id dense ids (names in categories.json).
VERSION = '1.2.0'
SPLITS = ('train', 'validation', 'test')


def dataset_dir(out: str) -> str:
  return os.path.join(out, DATASET_NAME, VERSION)


def tokenizer_path(out: str) -> str:
  return os.path.join(out, 'tokenizer.model')


def report_path(out: str) -> str:
  return os.path.join(out, 'build_report.json')


def categories_path(out: str) -> str:
  return os.path.join(out, 'categories.json')


def presence_path(out: str) -> str:
  return os.path.join(out, 'presence.npz')


def _rebuild_hint(data_dir: str) -> str:
  return f'build it with `python -m scale_jax.data.build --raw RAW_DIR --out {data_dir}`'


def load_categories(data_dir: str) -> list[str]:
  """The category names by dense label id."""
  path = epath.Path(categories_path(data_dir))
  if not path.is_file():
    raise FileNotFoundError(f'{path}: no category names here; {_rebuild_hint(data_dir)}')
  return json.loads(path.read_text(encoding='utf-8'))['categories']


def load_presence(data_dir: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  """(present, features_present) of a split: bool [records, modalities], row i = record i of the
  split's data source, so products can be chosen by modality without reading their records."""
  path = epath.Path(presence_path(data_dir))
  if not path.is_file():
    raise FileNotFoundError(f'{path}: no presence index here (datasets built before version '
                            f'{VERSION} have none); {_rebuild_hint(data_dir)}')
  with np.load(io.BytesIO(path.read_bytes())) as index:
    if f'{split}_present' not in index:
      splits = [k[:-len('_features_present')] for k in index if k.endswith('_features_present')]
      raise KeyError(f'{path}: no split {split!r} (it has {", ".join(splits)})')
    return index[f'{split}_present'], index[f'{split}_features_present']


def _check_bytes(check: str, data: bytes):
  """A cheap decode of a media file (its modality's check_bytes) or a features array (its size)."""
  if check == 'features':
    return media.decode_features(data).shape[1]
  return modalities.get(check).check_bytes(data)


def check_files(product: dict) -> tuple[dict, list, dict]:
  """Decodes each media and features file of a product once.

  Returns (the product with undecodable files set to None, [(kind, where, reason)],
  {modality: feature size}). Runs in worker processes: plain data in, plain data out.
  """
  product, problems, feature_dims = dict(product), [], {}
  fields = [(f, f, f) for f in raw.MEDIA] + [(f, 'features', m)
                                              for m, f in raw.FEATURE_FIELDS.items()]
  for field, check, modality in fields:
    path = product[field]
    if not path:
      continue
    try:
      with open(path, 'rb') as f:
        data = f.read()
      if not data:  # (what each decoder would make of it is less clear)
        raise media.MediaError('the file is empty (0 bytes)')
      result = _check_bytes(check, data)
    except (media.MediaError, OSError) as e:
      kind = 'silent audio' if isinstance(e, media.SilentAudio) else f'corrupt {check}'
      problems.append((kind, path, f'{e} ({field} of {product["where"]})'))
      product[field] = None
      continue
    if check == 'features':
      feature_dims[modality] = result
  return product, problems, feature_dims


def _check_all(products, problems, workers, progress):
  """check_files over all products, in `workers` processes; feature sizes made consistent."""
  desc = 'checking media'
  if workers > 1:
    ctx = multiprocessing.get_context('spawn')  # no fork of a process holding library threads
    pool = ctx.Pool(workers)
    results = pool.imap(check_files, products, chunksize=64)
  else:
    pool, results = None, map(check_files, products)
  checked, dims = [], []
  for product, found, feature_dims in tqdm.tqdm(results, total=len(products), desc=desc,
                                                unit='product', disable=not progress):
    for kind, where, reason in found:
      problems.add(kind, where, reason)
    checked.append(product)
    dims.append(feature_dims)
  if pool is not None:
    pool.close()
    pool.join()
  # Every product's features of a modality must have one size: the most common one wins.
  for m, field in raw.FEATURE_FIELDS.items():
    sizes = collections.Counter(d[m] for d in dims if m in d)
    if len(sizes) > 1:
      size = sizes.most_common(1)[0][0]
      for p, d in zip(checked, dims):
        if d.get(m, size) != size:
          problems.add('corrupt features', p[field],
                       f'{d[m]} values per token where the dataset has {size}')
          p[field] = None
  return checked


def usable(products, problems):
  """Drops (and counts) the products left with no modality at all."""
  kept = []
  for p in products:
    if any(raw.has_modality(p, m) for m in MODALITIES):
      kept.append(p)
    else:
      problems.add('no usable modality', p['where'],
                   f'product {p["item_id"]} has no usable modality')
  return kept


def shared_media(products: list[dict]) -> list[dict]:
  """The media files that products of many instances (at least 10, and 1% of all) name, most
  named first: a shop's "no image" placeholder, a brand banner, a stock video. Each is the same
  input for unrelated products, so it teaches the contrastive losses nothing about any of them;
  reported, not dropped (a catalogue may mean it)."""
  instances = collections.defaultdict(set)
  for p in products:
    for field in raw.MEDIA:
      if p[field] and not (field == 'audio' and p['audio_in_video']):
        instances[(field, p[field])].add(p['instance_index'])
  least = max(10, len({p['instance_index'] for p in products}) // 100)
  shared = [{'field': field, 'path': path, 'instances': len(named)}
            for (field, path), named in instances.items() if len(named) >= least]
  return sorted(shared, key=lambda s: -s['instances'])


def unread_fields(products: list[dict]) -> list[dict]:
  """The manifest's fields nothing reads, most used first, each with the field it likely means
  (raw.FIELD_ALIASES: "title" for "caption") where fewer products have that one."""
  counts = collections.Counter(k for p in products for k in p['unread'])
  out = []
  for name, n in counts.most_common():
    meant = raw.FIELD_ALIASES.get(name.lower())
    if meant and sum(bool(p.get(meant)) for p in products) >= n:
      meant = None
    out.append({'field': name, 'products': n, 'meant': meant})
  return out


_INTEGER = re.compile(r'-?[0-9]+')


def _name_order(name: str):
  """Integer-looking names in numeric order, then the others sorted: integer labels 0..K-1 keep
  their numbers as dense ids."""
  return (0, int(name), name) if _INTEGER.fullmatch(name) else (1, 0, name)


def instance_name(product: dict) -> str:
  """What a product's split is decided by: its instance id, or its item id without one."""
  return product['item_id'] if product['instance_id'] is None else product['instance_id']


def dense_ids(products: list[dict]) -> tuple[list[dict], list[str], int]:
  """Products with `label_index` and `instance_index` set: dense ids 0..K-1, names ordered by
  _name_order, products without an instance id each their own instance after the named ones.
  Returns (products, the category names by label_index, the number of instances)."""
  categories = sorted({p['label'] for p in products}, key=_name_order)
  named = sorted({p['instance_id'] for p in products if p['instance_id'] is not None},
                 key=_name_order)
  unnamed = sorted((p['item_id'] for p in products if p['instance_id'] is None), key=_name_order)
  label_index = {name: i for i, name in enumerate(categories)}
  # Separate name spaces: an item id may read like another product's instance id.
  instance_index = {(True, name): i for i, name in enumerate(named)}
  instance_index.update({(False, item_id): len(named) + i for i, item_id in enumerate(unnamed)})
  out = [dict(p, label_index=label_index[p['label']],
              instance_index=instance_index[(p['instance_id'] is not None, instance_name(p))])
         for p in products]
  return out, categories, len(instance_index)


def split_of(name: str, test_fraction: float, val_fraction: float) -> str:
  """A stable split by instance name, so rebuilding keeps every product in its split and the
  listings of one physical product together: test first, so the test split does not change with
  the validation fraction."""
  position = zlib.crc32(name.encode('utf-8')) % 10_000
  if position < test_fraction * 10_000:
    return 'test'
  if position < (test_fraction + val_fraction) * 10_000:
    return 'validation'
  return 'train'


def split_products(products: list[dict], test_fraction: float, val_fraction: float) -> dict:
  """{split: products}; no validation split when val_fraction is 0 (TFDS cannot write an empty
  split). Raises RawDataError, naming the split and what to change, for one that would be empty."""
  splits = {s: [] for s in SPLITS if s != 'validation' or val_fraction}
  for p in products:
    splits[split_of(instance_name(p), test_fraction, val_fraction)].append(p)
  change = {'train': f'lower --test-fraction (now {test_fraction}) and --val-fraction '
                     f'(now {val_fraction})',
            'validation': f'raise --val-fraction (now {val_fraction}), or set it to 0 for no '
                          'validation split',
            'test': f'raise --test-fraction (now {test_fraction})'}
  for split, members in splits.items():
    if not members:
      instances = len({p['instance_index'] for p in products})
      raise raw.RawDataError(
          f'split {split!r} would be empty: {len(products)} products in {instances} instance'
          f'{"s" if instances > 1 else ""}; give more products or {change[split]}')
  return splits


def _read(path):
  if not path:
    return b''
  with open(path, 'rb') as f:
    return f.read()


class ScaleProducts(tfds.core.GeneratorBasedBuilder):
  """Products with five modalities; media and features stored as encoded bytes (no TensorFlow)."""
  VERSION = tfds.core.Version(VERSION)

  def __init__(self, *, splits, tok, progress=True, **kwargs):
    self._splits, self._tok, self._progress = splits, tok, progress
    super().__init__(**kwargs)

  def _info(self):
    tensor = tfds.features.Tensor
    features = {
        'item_id': tfds.features.Text(),
        # Dense ids 0..K-1 (categories.json names the labels).
        'label': tfds.features.Scalar(dtype=np.int64),
        'instance_id': tfds.features.Scalar(dtype=np.int64),
        # Per modality in MODALITIES order: usable media (text: a caption; table: a pair).
        'present': tensor(shape=(len(MODALITIES),), dtype=np.bool_),
        # Per modality: usable pre-extracted features (text and table never have them).
        'features_present': tensor(shape=(len(MODALITIES),), dtype=np.bool_),
        'caption_tokens': tensor(shape=(None,), dtype=np.int32),
        'table_tokens': tensor(shape=(None,), dtype=np.int32),
        'table_entities': tensor(shape=(None,), dtype=np.int32),
        'audio_in_video': tfds.features.Scalar(dtype=np.bool_),  # audio is the video's track
    }
    for field in raw.MEDIA + tuple(raw.FEATURE_FIELDS.values()):
      features[field] = tensor(shape=(), dtype=np.object_)
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(products, split)
            for split, products in self._splits.items()}

  def _generate_examples(self, products, split):
    for p in tqdm.tqdm(products, desc=f'writing {split}', unit='product',
                       disable=not self._progress):
      table_tokens, table_entities = tokenizer.encode_table(self._tok, p['tabular'])
      example = {
          'item_id': p['item_id'], 'label': p['label_index'],
          'instance_id': p['instance_index'],
          'present': np.array([bool(p[raw.FIELDS[m]]) for m in MODALITIES]),
          'features_present': np.array([bool(p.get(raw.FEATURE_FIELDS.get(m)))
                                        for m in MODALITIES]),
          'caption_tokens': np.array(self._tok.encode(p['caption']), np.int32),
          'table_tokens': np.array(table_tokens, np.int32),
          'table_entities': np.array(table_entities, np.int32),
          'audio_in_video': p['audio_in_video'] and bool(p['audio']),
      }
      for field in raw.MEDIA + tuple(raw.FEATURE_FIELDS.values()):
        example[field] = _read(p[field])
      if example['audio_in_video']:
        example['audio'] = b''  # decoded from the video's bytes
        example['video'] = example['video'] or _read(p['audio'])  # kept for its sound track
      yield p['item_id'], example


def write_presence(out: str, splits, progress: bool) -> None:
  """OUT/presence.npz from the written splits, read back: TFDS shuffles at write time, so only
  the data source knows which record is which."""
  builder = tfds.builder_from_directory(dataset_dir(out))
  index = {}
  for split in splits:
    source = builder.as_data_source(split)
    present = np.zeros((len(source), len(MODALITIES)), np.bool_)
    features_present = np.zeros_like(present)
    for i in tqdm.trange(len(source), desc=f'indexing {split}', unit='product',
                         disable=not progress):
      record = source[i]
      present[i], features_present[i] = record['present'], record['features_present']
    index[f'{split}_present'], index[f'{split}_features_present'] = present, features_present
  np.savez(presence_path(out), **index)


def build(raw_dir: str, out: str, vocab_size: int = 1000, test_fraction: float = 0.15,
          val_fraction: float = 0.0, progress: bool = True, strict: bool = False,
          workers: int = 1) -> raw.Problems:
  """Builds tokenizer, dataset, category names, presence index and report; returns the problems
  found. `raw_dir` is the raw layout's directory or its manifest. Replaces an earlier build in
  `out`; the same raw input gives the same dataset. val_fraction 0 writes no validation split:
  the default here, as a catalogue of a hundred products has too few instances for one (the
  command line's default is 0.05)."""
  manifest = raw.manifest_path(raw_dir)
  problems = raw.Problems(strict)
  products = raw.read_manifest(manifest, problems)
  products = usable(_check_all(products, problems, workers, progress), problems)
  if not products:
    raise raw.RawDataError(f'{manifest}: no usable products '
                           f'({problems.summary_and_first()})')
  products, categories, instances = dense_ids(products)
  splits = split_products(products, test_fraction, val_fraction)  # before anything is written
  texts = [p['caption'] for p in products if p['caption']]
  texts += [f'{k} {v}' for p in products for k, v in p['tabular']]
  if not texts:
    raise raw.RawDataError(f'{manifest}: no product has a caption or a table, so the tokenizer '
                           f'has no text to learn from; give "caption" or "tabular" for some')
  os.makedirs(out, exist_ok=True)
  try:
    tok = tokenizer.train_tokenizer(texts, tokenizer_path(out), vocab_size, progress)
  except RuntimeError as e:  # sentencepiece's checks, e.g. fewer pieces than characters
    needed = re.search(r'(\d+) vs (\d+)', str(e))
    hint = f'; e.g. --vocab-size {int(needed[2]) + 64}' if needed else ''
    reason = str(e).split('] ')[-1].split(' Increase vocab_size')[0]  # its own flags: not ours
    raise raw.RawDataError(f'--vocab-size {vocab_size}: sentencepiece cannot train the tokenizer '
                           f'on these captions and tables ({reason}){hint}'
                           ) from None
  if os.path.exists(dataset_dir(out)):
    shutil.rmtree(dataset_dir(out))
  for stale in (presence_path(out), categories_path(out)):  # never beside another dataset
    if os.path.exists(stale):
      os.remove(stale)
  builder = ScaleProducts(splits=splits, tok=tok, progress=progress, data_dir=out,
                          file_format='array_record')
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      verify_ssl=False, download_mode=tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS))
  write_presence(out, splits, progress)
  with open(categories_path(out), 'w', encoding='utf-8') as f:
    json.dump({'categories': categories, 'instances': instances}, f, indent=1,
              ensure_ascii=False)
  with open(report_path(out), 'w', encoding='utf-8') as f:
    json.dump({'products': len(products), 'problems': dict(problems.counts),
               'details': [dict(zip(('kind', 'where', 'reason'), p)) for p in problems.items],
               'shared_media': shared_media(products), 'unread_fields': unread_fields(products)},
              f, indent=1, ensure_ascii=False)
  return problems


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--raw', required=True,
                      help='raw layout directory (holds manifest.jsonl) or the manifest file')
  parser.add_argument('--out', required=True, help='output directory')
  parser.add_argument('--vocab-size', type=int, default=1000, help='tokenizer vocabulary bound')
  parser.add_argument('--test-fraction', type=float, default=0.15,
                      help='share of instances in the test split')
  parser.add_argument('--val-fraction', type=float, default=0.05,
                      help='share of instances in the validation split (0: no validation split)')
  parser.add_argument('--strict', action='store_true',
                      help='stop at the first bad input instead of counting and skipping it')
  parser.add_argument('--workers', type=int, default=os.cpu_count() or 1,
                      help='processes that check media (default: one per core)')
  args = parser.parse_args(argv)
  try:
    problems = build(args.raw, args.out, args.vocab_size, args.test_fraction, args.val_fraction,
                     strict=args.strict, workers=args.workers)
  except raw.RawDataError as e:
    raise SystemExit(f'error: {e}') from None
  info = tfds.builder_from_directory(dataset_dir(args.out)).info
  categories = len(load_categories(args.out))
  print(f'built {dataset_dir(args.out)}: '
        + ', '.join(f'{k} {v.num_examples}' for k, v in info.splits.items())
        + f'; {categories} categor{"y" if categories == 1 else "ies"}; tokenizer '
        + tokenizer_path(args.out))
  print(f'bad input: {problems.summary()}'
        + (f' (each one in {report_path(args.out)})' if problems else ''))
  with open(report_path(args.out), encoding='utf-8') as f:
    report = json.load(f)
  if unread := report['unread_fields']:
    print('warning: fields nothing reads (docs/data.md names the fields): ' + ', '.join(
        f'{u["field"]} ({u["products"]} products'
        + (f': the {u["meant"]}? name it "{u["meant"]}")' if u['meant'] else ')')
        for u in unread))
  shared = report['shared_media']
  for s in shared[:3]:
    print(f'warning: {s["instances"]} instances share one {s["field"]} file, {s["path"]} (a '
          f'placeholder? it teaches nothing about any of them): give them their own, or leave '
          f'the field out for those without one'
          + (f' ({len(shared)} such files, all in {report_path(args.out)})'
             if len(shared) > 3 and s is shared[0] else ''))
  if categories == 1:
    print('warning: every product has the same label: coarse-grained retrieval, classification '
          'and clustering will score 100% for any model; give each product its category in '
          '"label" (docs/data.md)')


if __name__ == '__main__':
  main()
