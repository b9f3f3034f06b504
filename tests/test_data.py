import json
import os
import shutil

import numpy as np
import pytest

from scale_jax import MODALITIES
from scale_jax.data import build, media, pipeline, raw, synthetic, tokenizer


def test_parse_table_official_string():
  assert raw.parse_table('color#:#red#;#size#:#XL') == [('color', 'red'), ('size', 'XL')]
  assert raw.parse_table('') == [] and raw.parse_table(None) == []
  with pytest.raises(ValueError, match='no "#:#"'):
    raw.parse_table('color=red')


def _copy_raw(raw_dir, tmp_path, edit):
  """A copy of the catalogue whose first product is changed by edit(record, root)."""
  root = tmp_path / 'raw'
  shutil.copytree(raw_dir, root)
  lines = (root / 'manifest.jsonl').read_text(encoding='utf-8').splitlines()
  record = json.loads(lines[0])
  lines[0] = edit(record, root)
  (root / 'manifest.jsonl').write_text('\n'.join(lines) + '\n', encoding='utf-8')
  return root


def test_missing_manifest_names_the_file(tmp_path):
  with pytest.raises(raw.RawDataError, match=f'{tmp_path}/manifest.jsonl: manifest not found'):
    build.build(str(tmp_path), str(tmp_path / 'out'), progress=False)


def test_broken_line_names_file_and_line(raw_dir, tmp_path):
  root = _copy_raw(raw_dir, tmp_path, lambda r, _: '{"item_id": "p0", ')
  with pytest.raises(raw.RawDataError, match=r'manifest.jsonl:1: not a JSON object'):
    raw.read_manifest(str(root / 'manifest.jsonl'))


def test_missing_media_file_names_it(raw_dir, tmp_path):
  def edit(r, _):
    r['image'] = 'images/nope.jpg'
    return json.dumps(r)
  root = _copy_raw(raw_dir, tmp_path, edit)
  with pytest.raises(raw.RawDataError, match=r'images/nope.jpg: image file named on .* not exist'):
    raw.read_manifest(str(root / 'manifest.jsonl'))


@pytest.mark.parametrize('field', ['image', 'video', 'audio'])
def test_undecodable_media_names_the_file(raw_dir, tmp_path, field):
  def edit(r, root):
    (root / 'broken.bin').write_bytes(b'\x00not media at all' * 10)
    r[field] = 'broken.bin'
    return json.dumps(r)
  root = _copy_raw(raw_dir, tmp_path, edit)
  with pytest.raises(raw.RawDataError, match=f'broken.bin: cannot decode {field}'):
    build.build(str(root), str(tmp_path / 'out'), progress=False)


def test_frame_conversion_matches_ffmpeg():
  import io

  import av
  # Smooth content (chroma is subsampled, so pixel noise would not survive any codec).
  ramp = np.linspace(0, 255, 32)
  frame_rgb = np.stack([ramp[:, None] + 0 * ramp, 0 * ramp[:, None] + ramp,
                        255 - ramp[:, None] + 0 * ramp], -1).astype(np.uint8)
  data = synthetic.encode_mp4(np.stack([frame_rgb] * 2), fps=2)
  with av.open(io.BytesIO(data)) as container:
    frame = next(container.decode(video=0))
    reference = frame.to_ndarray(format='rgb24') / 255.0
    ours = media._frame_to_rgb(frame, 32)
  assert np.abs(ours - reference).mean() < 0.02
  assert np.abs(ours - frame_rgb / 255.0).mean() < 0.03


def test_log_mel_peaks_at_the_tone():
  rate = 16000
  t = np.arange(rate) / rate
  low, high = (media.log_mel(np.sin(2 * np.pi * f * t).astype(np.float32), rate, 512, 256, 32)
               for f in (300.0, 3000.0))
  assert low.shape == (1 + (rate - 512) // 256, 32)
  assert low.mean(0).argmax() < high.mean(0).argmax()


def test_dataset_splits_and_tokenizer(data_dir):
  train, test = pipeline.open_split(data_dir, 'train'), pipeline.open_split(data_dir, 'test')
  assert len(train) + len(test) == 96 and len(test) > 0
  ids = {train[i]['item_id'] for i in range(len(train))}
  assert not ids & {test[i]['item_id'] for i in range(len(test))}
  tok = tokenizer.load_tokenizer(build.tokenizer_path(data_dir))
  ex = train[0]
  assert tok.decode(ex['caption_tokens'].tolist())  # round-trips to text


def test_batches_have_the_documented_shapes(config):
  batch = next(iter(pipeline.train_dataset(config)))
  spec = pipeline.dummy_batch(config, config.batch_size)
  assert set(batch) == set(spec)
  for k in spec:
    assert batch[k].shape == spec[k].shape and batch[k].dtype == spec[k].dtype, k
  # Absent modalities have no valid position; present ones have some.
  for i, m in enumerate(MODALITIES):
    assert not batch[f'{m}_valid'][~batch['present'][:, i]].any()
    assert batch[f'{m}_valid'][batch['present'][:, i]].any(axis=1).all()


def test_same_seed_same_batches(config):
  a, b = iter(pipeline.train_dataset(config)), iter(pipeline.train_dataset(config))
  for _ in range(3):
    x, y = next(a), next(b)
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  config.seed = 1
  z = next(iter(pipeline.train_dataset(config)))
  assert not np.array_equal(z['label'], next(iter(pipeline.train_dataset(config)))['label']) or \
      not np.array_equal(z['instance'], x['instance'])


def _fingerprints(batch):
  """One hash per product from its decoded content (noise makes every product's unique)."""
  keys = ('text_target', 'table_target', 'image_input', 'video_input', 'audio_input')
  return [hash(b''.join(batch[k][i].tobytes() for k in keys)) for i in range(len(batch['label']))]


def test_processes_read_disjoint_shares_covering_the_split(config, data_dir):
  n = len(pipeline.open_split(data_dir, 'train'))
  config.batch_size = 2  # one example per process per step
  shares = []
  for p in range(2):
    it = iter(pipeline.train_dataset(config, process_index=p, process_count=2))
    shares.append([f for _ in range(n // 2) for f in _fingerprints(next(it))])
  assert not set(shares[0]) & set(shares[1])
  assert len(set(shares[0]) | set(shares[1])) == 2 * (n // 2)  # one epoch, every product once
  whole = iter(pipeline.train_dataset(config, process_index=0, process_count=1))
  one_process = {f for _ in range(n // 2) for f in _fingerprints(next(whole))}
  assert one_process == set(shares[0]) | set(shares[1])


def test_masks(config):
  batch = next(iter(pipeline.train_dataset(config)))
  specials = np.isin(batch['text_target'], [tokenizer.PAD, tokenizer.CLS, tokenizer.SEP])
  assert not (batch['text_masked'] & specials).any()
  for m in MODALITIES:
    assert not (batch[f'{m}_masked'] & ~batch[f'{m}_valid']).any()
  changed = batch['text_input'] != batch['text_target']
  assert not (changed & ~batch['text_masked']).any()  # only masked tokens are corrupted


def test_mem_masks_whole_entities(config):
  source = pipeline.open_split(config.data.dir, 'train')
  pre = pipeline.Preprocess(pipeline._plain(config))
  config.table.mask_rate = 0.5
  mask = pipeline.Mask(pipeline._plain(config), config.model.vocab_size)
  rng = np.random.default_rng(0)
  hits = 0
  for i in range(20):
    ex = pre.map(source[i])
    entities = ex['table_entities'].copy()
    out = mask.random_map(ex, rng)
    for e in np.unique(entities[out['table_masked']]):
      assert e > 0  # never a [SEP]
      assert out['table_masked'][entities == e].all()  # the whole key or value
      hits += 1
  assert hits > 0
