r"""Builds the TFDS dataset and the tokenizer from a raw layout.

    python -m scale_jax.data.build --raw DIR --out DIR

Writes OUT/tokenizer.model and OUT/scale_products/1.0.0/ (array_record, splits train and test).
Media are checked (decoded once) and stored encoded; the Grain pipeline decodes them.
"""
import argparse
import os
import shutil
import zlib

import numpy as np
import tensorflow_datasets as tfds
import tqdm

from scale_jax import MODALITIES
from scale_jax.data import media, raw, tokenizer

DATASET_NAME = 'scale_products'
VERSION = '1.0.0'


def dataset_dir(out: str) -> str:
  return os.path.join(out, DATASET_NAME, VERSION)


def tokenizer_path(out: str) -> str:
  return os.path.join(out, 'tokenizer.model')


def check_media(product: dict) -> None:
  """Decodes each media file once; raises RawDataError naming the file that fails."""
  checks = {'image': lambda b: media.decode_image(b, 8),
            'video': lambda b: media.decode_video(b, 1, 8, 1.0),
            'audio': lambda b: media.decode_audio(b, 16000, 0.1)}
  for field, check in checks.items():
    if product[field]:
      with open(product[field], 'rb') as f:
        data = f.read()
      try:
        check(data)
      except media.MediaError as e:
        raise raw.RawDataError(f'{product[field]}: {e}') from e


def is_test(item_id: str, test_fraction: float) -> bool:
  """A stable split by item id, so rebuilding keeps every product in its split."""
  return zlib.crc32(item_id.encode('utf-8')) % 10_000 < test_fraction * 10_000


class ScaleProducts(tfds.core.GeneratorBasedBuilder):
  """Products with five modalities; media stored as encoded bytes (no TensorFlow needed)."""
  VERSION = tfds.core.Version(VERSION)

  def __init__(self, *, products, tok, test_fraction, **kwargs):
    self._products, self._tok, self._test_fraction = products, tok, test_fraction
    super().__init__(**kwargs)

  def _info(self):
    tensor = tfds.features.Tensor
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        'item_id': tfds.features.Text(),
        'label': tfds.features.Scalar(dtype=np.int64),
        'instance_id': tfds.features.Scalar(dtype=np.int64),
        'present': tensor(shape=(len(MODALITIES),), dtype=np.bool_),
        'caption_tokens': tensor(shape=(None,), dtype=np.int32),
        'table_tokens': tensor(shape=(None,), dtype=np.int32),
        'table_entities': tensor(shape=(None,), dtype=np.int32),
        'image': tensor(shape=(), dtype=np.object_),
        'video': tensor(shape=(), dtype=np.object_),
        'audio': tensor(shape=(), dtype=np.object_),
    }))

  def _split_generators(self, dl_manager):
    del dl_manager
    test = [p for p in self._products if is_test(p['item_id'], self._test_fraction)]
    train = [p for p in self._products if not is_test(p['item_id'], self._test_fraction)]
    return {'train': self._generate_examples(train), 'test': self._generate_examples(test)}

  def _generate_examples(self, products):
    for p in products:
      table_tokens, table_entities = tokenizer.encode_table(self._tok, p['tabular'])
      example = {
          'item_id': p['item_id'], 'label': p['label'], 'instance_id': p['instance_id'],
          'present': np.array([bool(p[raw.FIELDS[m]]) for m in MODALITIES]),
          'caption_tokens': np.array(self._tok.encode(p['caption']), np.int32),
          'table_tokens': np.array(table_tokens, np.int32),
          'table_entities': np.array(table_entities, np.int32),
      }
      for field in raw.MEDIA:
        example[field] = b''
        if p[field]:
          with open(p[field], 'rb') as f:
            example[field] = f.read()
      yield p['item_id'], example


def build(raw_dir: str, out: str, vocab_size: int = 1000, test_fraction: float = 0.15,
          progress: bool = True) -> str:
  """Builds tokenizer and dataset; returns the dataset directory. Replaces an earlier build."""
  manifest = os.path.join(raw_dir, 'manifest.jsonl')
  products = raw.read_manifest(manifest)
  for p in tqdm.tqdm(products, desc='checking media', disable=not progress):
    check_media(p)
  os.makedirs(out, exist_ok=True)
  texts = [p['caption'] for p in products if p['caption']]
  texts += [f'{k} {v}' for p in products for k, v in p['tabular']]
  tok = tokenizer.train_tokenizer(texts, tokenizer_path(out), vocab_size)
  if os.path.exists(dataset_dir(out)):
    shutil.rmtree(dataset_dir(out))
  builder = ScaleProducts(products=products, tok=tok, test_fraction=test_fraction,
                          data_dir=out, file_format='array_record')
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      verify_ssl=False, download_mode=tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS))
  return dataset_dir(out)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--raw', required=True, help='raw layout directory (holds manifest.jsonl)')
  parser.add_argument('--out', required=True, help='output directory')
  parser.add_argument('--vocab-size', type=int, default=1000, help='tokenizer vocabulary bound')
  parser.add_argument('--test-fraction', type=float, default=0.15)
  args = parser.parse_args(argv)
  try:
    path = build(args.raw, args.out, args.vocab_size, args.test_fraction)
  except raw.RawDataError as e:
    raise SystemExit(f'error: {e}') from None
  info = tfds.builder_from_directory(path).info
  print(f'built {path}: ' + ', '.join(f'{k} {v.num_examples}' for k, v in info.splits.items())
        + f'; tokenizer {tokenizer_path(args.out)}')


if __name__ == '__main__':
  main()
