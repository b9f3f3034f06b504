r"""Builds the TFDS dataset and the tokenizer from a raw layout.

    python -m scale_jax.data.build --raw DIR --out DIR [--strict] [--workers N]

Writes OUT/tokenizer.model, OUT/scale_products/1.1.0/ (array_record, splits train and test) and
OUT/build_report.json (every problem found, by kind). Media and feature files are checked (decoded
once, in worker processes) and stored encoded; the Grain pipeline decodes them. A broken modality
is counted and marked absent, a broken line counted and skipped; `--strict` stops at the first
problem instead, naming the file and the reason.
"""
import argparse
import collections
import json
import multiprocessing
import os
import shutil
import zlib

import numpy as np
import tensorflow_datasets as tfds
import tqdm

from scale_jax import MODALITIES
from scale_jax.data import media, raw, tokenizer

DATASET_NAME = 'scale_products'
VERSION = '1.1.0'  # 1.1.0: features, features_present, audio_in_video


def dataset_dir(out: str) -> str:
  return os.path.join(out, DATASET_NAME, VERSION)


def tokenizer_path(out: str) -> str:
  return os.path.join(out, 'tokenizer.model')


def report_path(out: str) -> str:
  return os.path.join(out, 'build_report.json')


# A cheap decode of each media kind: the file must decode, at any size.
_CHECKS = {'image': lambda b: media.decode_image(b, 8),
           'video': lambda b: media.decode_video(b, 1, 8, 1.0),
           'audio': lambda b: media.decode_audio(b, 16000, 0.1),
           'features': lambda b: media.decode_features(b).shape[1]}


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
        result = _CHECKS[check](f.read())
    except (media.MediaError, OSError) as e:
      problems.append((f'corrupt {check}', path, f'{e} ({field} of {product["where"]})'))
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


def is_test(item_id: str, test_fraction: float) -> bool:
  """A stable split by item id, so rebuilding keeps every product in its split."""
  return zlib.crc32(item_id.encode('utf-8')) % 10_000 < test_fraction * 10_000


def _read(path):
  if not path:
    return b''
  with open(path, 'rb') as f:
    return f.read()


class ScaleProducts(tfds.core.GeneratorBasedBuilder):
  """Products with five modalities; media and features stored as encoded bytes (no TensorFlow)."""
  VERSION = tfds.core.Version(VERSION)

  def __init__(self, *, products, tok, test_fraction, progress=True, **kwargs):
    self._products, self._tok, self._test_fraction = products, tok, test_fraction
    self._progress = progress
    super().__init__(**kwargs)

  def _info(self):
    tensor = tfds.features.Tensor
    features = {
        'item_id': tfds.features.Text(),
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
    test = [p for p in self._products if is_test(p['item_id'], self._test_fraction)]
    train = [p for p in self._products if not is_test(p['item_id'], self._test_fraction)]
    return {'train': self._generate_examples(train, 'train'),
            'test': self._generate_examples(test, 'test')}

  def _generate_examples(self, products, split):
    for p in tqdm.tqdm(products, desc=f'writing {split}', unit='product',
                       disable=not self._progress):
      table_tokens, table_entities = tokenizer.encode_table(self._tok, p['tabular'])
      example = {
          'item_id': p['item_id'], 'label': p['label'], 'instance_id': p['instance_id'],
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


def build(raw_dir: str, out: str, vocab_size: int = 1000, test_fraction: float = 0.15,
          progress: bool = True, strict: bool = False, workers: int = 1) -> raw.Problems:
  """Builds tokenizer, dataset and report; returns the problems found. Replaces an earlier build
  in `out`; the same raw input gives the same dataset."""
  manifest = os.path.join(raw_dir, 'manifest.jsonl')
  problems = raw.Problems(strict)
  products = raw.read_manifest(manifest, problems)
  products = usable(_check_all(products, problems, workers, progress), problems)
  if not products:
    raise raw.RawDataError(f'{manifest}: no usable products ({problems.summary()})')
  os.makedirs(out, exist_ok=True)
  texts = [p['caption'] for p in products if p['caption']]
  texts += [f'{k} {v}' for p in products for k, v in p['tabular']]
  tok = tokenizer.train_tokenizer(texts, tokenizer_path(out), vocab_size, progress)
  if os.path.exists(dataset_dir(out)):
    shutil.rmtree(dataset_dir(out))
  builder = ScaleProducts(products=products, tok=tok, test_fraction=test_fraction,
                          progress=progress, data_dir=out, file_format='array_record')
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      verify_ssl=False, download_mode=tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS))
  with open(report_path(out), 'w', encoding='utf-8') as f:
    json.dump({'products': len(products), 'problems': dict(problems.counts),
               'details': [dict(zip(('kind', 'where', 'reason'), p)) for p in problems.items]},
              f, indent=1, ensure_ascii=False)
  return problems


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--raw', required=True, help='raw layout directory (holds manifest.jsonl)')
  parser.add_argument('--out', required=True, help='output directory')
  parser.add_argument('--vocab-size', type=int, default=1000, help='tokenizer vocabulary bound')
  parser.add_argument('--test-fraction', type=float, default=0.15)
  parser.add_argument('--strict', action='store_true',
                      help='stop at the first bad input instead of counting and skipping it')
  parser.add_argument('--workers', type=int, default=os.cpu_count() or 1,
                      help='processes that check media (default: one per core)')
  args = parser.parse_args(argv)
  try:
    problems = build(args.raw, args.out, args.vocab_size, args.test_fraction,
                     strict=args.strict, workers=args.workers)
  except raw.RawDataError as e:
    raise SystemExit(f'error: {e}') from None
  info = tfds.builder_from_directory(dataset_dir(args.out)).info
  print(f'built {dataset_dir(args.out)}: '
        + ', '.join(f'{k} {v.num_examples}' for k, v in info.splits.items())
        + f'; tokenizer {tokenizer_path(args.out)}')
  print(f'bad input: {problems.summary()}'
        + (f' (each one in {report_path(args.out)})' if problems else ''))


if __name__ == '__main__':
  main()
