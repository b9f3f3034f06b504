"""The build's splits, dense ids, categories, presence index and manifest path
(scale_jax/data/build.py)."""
import json
import os
import shutil

import numpy as np
import pytest
import tensorflow_datasets as tfds

from scale_jax.data import build, raw, synthetic


@pytest.fixture(scope='module')
def catalogue(tmp_path_factory):
  """90 products in 29 instances, 4 categories labelled 0..3."""
  out = tmp_path_factory.mktemp('catalogue')
  synthetic.write_catalogue(str(out), num_products=90, seed=0, progress=False)
  return out


def _manifest(root):
  lines = (root / 'manifest.jsonl').read_text(encoding='utf-8').splitlines()
  return [json.loads(line) for line in lines]


def _edited(catalogue, root, edit):
  """A copy of the catalogue whose i-th record is replaced by edit(record, i, root). Returns the
  original records."""
  shutil.copytree(catalogue, root)
  originals = _manifest(root)
  edited = [edit(dict(r), i, root) for i, r in enumerate(originals)]
  (root / 'manifest.jsonl').write_text(
      ''.join(json.dumps(r, ensure_ascii=False) + '\n' for r in edited), encoding='utf-8')
  return originals


def _build(raw_path, out, **kwargs):
  return build.build(str(raw_path), str(out), vocab_size=400, progress=False, **kwargs)


def _records(out):
  """{split: [record, ...]} in data-source order, item ids as str."""
  builder = tfds.builder_from_directory(build.dataset_dir(str(out)))
  records = {}
  for split in builder.info.splits:
    source = builder.as_data_source(split)
    records[split] = [dict(source[i]) for i in range(len(source))]
    for r in records[split]:
      r['item_id'] = r['item_id'].decode('utf-8')
  return records


def _by_item(records):
  return {r['item_id']: (split, r) for split, rs in records.items() for r in rs}


def test_no_instance_in_two_splits(catalogue, tmp_path):
  _build(catalogue, tmp_path / 'out', val_fraction=0.15)
  records = _records(tmp_path / 'out')
  assert set(records) == {'train', 'validation', 'test'} and all(records.values())
  instances = {split: {int(r['instance_id']) for r in rs} for split, rs in records.items()}
  assert not instances['train'] & instances['validation']
  assert not instances['train'] & instances['test']
  assert not instances['validation'] & instances['test']
  built = _by_item(records)
  assert len(built) == 90
  # The listings of one manifest instance share a split and a dense id; integer labels 0..3 keep
  # their numbers.
  splits_of, ids_of = {}, {}
  for r in _manifest(catalogue):
    split, ex = built[r['item_id']]
    splits_of.setdefault(r['instance_id'], set()).add(split)
    ids_of.setdefault(r['instance_id'], set()).add(int(ex['instance_id']))
    assert ex['label'] == r['label']
  assert all(len(s) == 1 for s in splits_of.values())
  assert all(len(s) == 1 for s in ids_of.values())
  assert build.load_categories(str(tmp_path / 'out')) == ['0', '1', '2', '3']


def test_without_instance_ids_the_split_goes_by_item_id(catalogue, tmp_path):
  def no_instance(r, i, root):
    del r['instance_id']
    return r
  _edited(catalogue, tmp_path / 'raw', no_instance)
  _build(tmp_path / 'raw', tmp_path / 'out', val_fraction=0.15)
  built = _by_item(_records(tmp_path / 'out'))
  assert {split for split, _ in built.values()} == {'train', 'validation', 'test'}
  for item_id, (split, _) in built.items():
    assert split == build.split_of(item_id, 0.15, 0.15), item_id
  # Every product is its own instance.
  assert sorted(int(ex['instance_id']) for _, ex in built.values()) == list(range(90))
  with open(build.categories_path(str(tmp_path / 'out')), encoding='utf-8') as f:
    assert json.load(f)['instances'] == 90


def test_rebuild_gives_the_same_splits(catalogue, tmp_path):
  for out in ('first', 'second', 'second'):  # the last one over its own output
    _build(catalogue, tmp_path / out, val_fraction=0.15)
  first, second = _records(tmp_path / 'first'), _records(tmp_path / 'second')
  assert set(first) == set(second) == {'train', 'validation', 'test'}
  for split, records in first.items():
    assert [(r['item_id'], r['instance_id'], r['label']) for r in records] == [
        (r['item_id'], r['instance_id'], r['label']) for r in second[split]]


def test_string_instance_ids_and_category_names(catalogue, tmp_path):
  names = ['shoes', 'bags', 'hats', 'cups']
  def named(r, i, root):
    r.update(label=names[r['label']], instance_id=f'inst{r["instance_id"]}')
    return r
  originals = _edited(catalogue, tmp_path / 'raw', named)
  problems = _build(tmp_path / 'raw', tmp_path / 'out')
  assert not problems
  categories = build.load_categories(str(tmp_path / 'out'))
  assert categories == sorted(names)
  built = _by_item(_records(tmp_path / 'out'))
  assert len(built) == len(originals)
  dense = {}
  for r in originals:
    _, ex = built[r['item_id']]
    assert categories[ex['label']] == names[r['label']]
    dense.setdefault(r['instance_id'], set()).add(int(ex['instance_id']))
  assert all(len(ids) == 1 for ids in dense.values())
  assert sorted(ids.pop() for ids in dense.values()) == list(range(len(dense)))


def test_labels_and_ids_spelled_apart_but_read_alike_are_one(catalogue, tmp_path):
  # As hand-kept spreadsheets and scraped pages write them: a stray space, a non-breaking one,
  # "café" typed on a Mac (e + combining accent, NFD), on Windows (é, NFC) and misread on the way
  # (mojibake), an HTML-escaped "&". Case is the catalogue's own: "Hats" and "hats" stay two.
  spellings = {0: ['shoes', ' shoes', 'shoes\u00a0'],
               1: ['caf\u00e9', 'cafe\u0301', 'caf\u00c3\u00a9'],
               2: ['hats', 'Hats'], 3: ['bags  & cases', 'bags &amp; cases ']}
  read_as = {0: 'shoes', 1: 'caf\u00e9', 3: 'bags & cases'}
  def respelled(r, i, root):
    names = spellings[r['label']]
    spaced = f'inst{r["instance_id"]}' + ' ' * (i % 2)
    return dict(r, label=names[i % len(names)], instance_id=spaced)
  originals = _edited(catalogue, tmp_path / 'raw', respelled)
  assert not _build(tmp_path / 'raw', tmp_path / 'out')
  categories = build.load_categories(str(tmp_path / 'out'))
  assert categories == ['Hats', 'bags & cases', 'caf\u00e9', 'hats', 'shoes']
  built = _by_item(_records(tmp_path / 'out'))
  assert len(built) == len(originals)
  dense = {}
  for i, r in enumerate(originals):
    _, ex = built[r['item_id']]
    label = r['label']
    assert categories[ex['label']] == read_as.get(label, spellings[2][i % 2])
    dense.setdefault(r['instance_id'], set()).add(int(ex['instance_id']))
  assert all(len(ids) == 1 for ids in dense.values())
  assert sorted(ids.pop() for ids in dense.values()) == list(range(len(dense)))


def test_a_spaced_item_id_is_the_same_id(catalogue, tmp_path):
  first_id = _manifest(catalogue)[0]['item_id']
  _edited(catalogue, tmp_path / 'raw',
          lambda r, i, root: dict(r, item_id=f' {first_id} ') if i == 1 else r)
  problems = _build(tmp_path / 'raw', tmp_path / 'out')
  assert dict(problems.counts) == {'duplicate item_id': 1}
  assert f'item_id {first_id!r} appeared before' in problems.items[0][2]


def test_integer_ids_of_any_width_and_mixed_labels(catalogue, tmp_path):
  labels = {0: 10, 1: '2', 2: 'shoes', 3: 3}
  wide = {0: 3 + 2**40, 1: 3 + 2**41}  # both equal instance 3 in their low 32 bits
  def mixed(r, i, root):
    r.update(item_id=i, label=labels[r['label']], instance_id=wide.get(i, r['instance_id']))
    if r['label'] == '2' and i % 2:
      r['label'] = 2  # the same category as '2'
    return r
  originals = _edited(catalogue, tmp_path / 'raw', mixed)
  _build(tmp_path / 'raw', tmp_path / 'out')
  # Integer-looking names in numeric order, then the others.
  assert build.load_categories(str(tmp_path / 'out')) == ['2', '3', '10', 'shoes']
  built = _by_item(_records(tmp_path / 'out'))
  assert set(built) == {str(i) for i in range(len(originals))}
  three = {int(ex['instance_id']) for item_id, (_, ex) in built.items()
           if int(item_id) > 1 and originals[int(item_id)]['instance_id'] == 3}
  assert len(three) == 1
  ids = {int(built['0'][1]['instance_id']), int(built['1'][1]['instance_id'])} | three
  with open(build.categories_path(str(tmp_path / 'out')), encoding='utf-8') as f:
    instances = json.load(f)['instances']
  assert len(ids) == 3 and max(ids) < instances < 100  # dense: they fit the pipeline's int32
  assert {int(ex['label']) for _, ex in built.values()} == {0, 1, 2, 3}


def test_unusable_ids_are_broken_lines(catalogue, tmp_path):
  def unusable(r, i, root):
    edits = {0: {'label': {'id': 1}}, 1: {'instance_id': True}, 2: {'label': ' \t'},
             3: {'instance_id': float(r['instance_id'])}}  # pandas' integers: kept
    return dict(r, **edits.get(i, {}))
  originals = _edited(catalogue, tmp_path / 'raw', unusable)
  problems = _build(tmp_path / 'raw', tmp_path / 'out')
  assert dict(problems.counts) == {'broken line': 3}
  reasons = [reason for _, _, reason in problems.items]
  assert "label {'id': 1} is neither text nor an integer" in reasons[0]
  assert 'instance_id True is neither text nor an integer' in reasons[1]
  assert 'required field "label" is missing' in reasons[2]
  built = _by_item(_records(tmp_path / 'out'))
  same_instance = {int(built[r['item_id']][1]['instance_id']) for r in originals[3:]
                   if r['instance_id'] == originals[3]['instance_id']}
  assert len(same_instance) == 1


def _train_instance_name():
  return next(n for n in (f'solo{k}' for k in range(100)) if build.split_of(n, 0.15, 0) == 'train')


@pytest.mark.parametrize('fractions, message', [
    ({}, "split 'test' would be empty: 90 products in 1 instance; give more products or raise "
         "--test-fraction (now 0.15)"),
    ({'val_fraction': 0.05}, "split 'validation' would be empty: 90 products in 1 instance; "
                             "give more products or raise --val-fraction (now 0.05)"),
    ({'test_fraction': 0.5, 'val_fraction': 0.5}, "split 'train' would be empty: 90 products in "
                                                  "1 instance; give more products or lower "
                                                  "--test-fraction (now 0.5)")])
def test_an_empty_split_stops_the_build_before_anything_is_written(catalogue, tmp_path,
                                                                   fractions, message):
  solo = _train_instance_name()  # test 0.5 and validation 0.5 leave no name in train
  _edited(catalogue, tmp_path / 'raw', lambda r, i, root: dict(r, instance_id=solo))
  with pytest.raises(raw.RawDataError) as error:
    _build(tmp_path / 'raw', tmp_path / 'out', **fractions)
  assert message in str(error.value)
  assert not os.path.exists(tmp_path / 'out')
  if not fractions:  # the command line says it as an error, not a traceback
    with pytest.raises(SystemExit, match="^error: split 'test' would be empty"):
      build.main(['--raw', str(tmp_path / 'raw'), '--out', str(tmp_path / 'out'),
                  '--val-fraction', '0', '--workers', '1'])


def test_raw_names_the_manifest_file_and_val_fraction_0_writes_no_validation_split(
    catalogue, tmp_path, capsys):
  shutil.copytree(catalogue, tmp_path / 'raw')
  os.rename(tmp_path / 'raw' / 'manifest.jsonl', tmp_path / 'raw' / 'products.jsonl')
  build.main(['--raw', str(tmp_path / 'raw' / 'products.jsonl'), '--out', str(tmp_path / 'out'),
              '--vocab-size', '400', '--val-fraction', '0', '--workers', '1'])
  out = capsys.readouterr().out
  assert 'train 78, test 12; 4 categories' in out and 'warning' not in out
  assert set(_records(tmp_path / 'out')) == {'train', 'test'}
  with pytest.raises(KeyError, match="no split 'validation'"):
    build.load_presence(str(tmp_path / 'out'), 'validation')
  with pytest.raises(raw.RawDataError, match='none.jsonl: manifest not found'):
    _build(tmp_path / 'raw' / 'none.jsonl', tmp_path / 'out')


def test_a_catalogue_without_any_text_stops_before_anything_is_written(catalogue, tmp_path):
  _edited(catalogue, tmp_path / 'raw', lambda r, i, root: dict(r, caption=None, tabular=None))
  with pytest.raises(raw.RawDataError, match='no product has a caption or a table, so the '
                                             'tokenizer has no text to learn from'):
    _build(tmp_path / 'raw', tmp_path / 'out')
  assert not os.path.exists(tmp_path / 'out')


def test_a_vocabulary_too_small_for_the_text_names_a_size_that_works(catalogue, tmp_path):
  with pytest.raises(raw.RawDataError, match=r'--vocab-size 40: sentencepiece cannot train the '
                                             r'tokenizer .*; e.g. --vocab-size (\d+)$') as error:
    build.build(str(catalogue), str(tmp_path / 'out'), vocab_size=40, progress=False)
  works = int(str(error.value).rsplit(' ', 1)[1])
  build.build(str(catalogue), str(tmp_path / 'out'), vocab_size=works, progress=False)


def test_a_catalogue_of_one_label_is_warned_about(catalogue, tmp_path, capsys):
  _edited(catalogue, tmp_path / 'raw', lambda r, i, root: dict(r, label='shoes'))
  build.main(['--raw', str(tmp_path / 'raw'), '--out', str(tmp_path / 'out'),
              '--vocab-size', '400', '--val-fraction', '0', '--workers', '1'])
  assert ('; 1 category;' in (out := capsys.readouterr().out)
          and 'warning: every product has the same label' in out)


def test_a_placeholder_image_many_instances_share_is_warned_about(catalogue, tmp_path, capsys):
  """A shop's "no image" picture, named by products of 12 of the 29 instances (at least 10 are
  needed); the video one instance's listings share is theirs, not a placeholder."""
  originals = _manifest(catalogue)
  first = {}
  for i, r in enumerate(originals):
    first.setdefault(r['instance_id'], i)
  placeholder = set(list(first.values())[:12])
  def shared(r, i, root):
    if i in placeholder:
      r['image'] = originals[0]['image']
    if r['instance_id'] == originals[1]['instance_id']:
      r['video'] = originals[1]['video']
    return r
  _edited(catalogue, tmp_path / 'raw', shared)
  build.main(['--raw', str(tmp_path / 'raw'), '--out', str(tmp_path / 'out'),
              '--vocab-size', '400', '--val-fraction', '0', '--workers', '1'])
  path = str(tmp_path / 'raw' / originals[0]['image'])
  assert (f'warning: 12 instances share one image file, {path} (a placeholder?'
          in capsys.readouterr().out)
  with open(build.report_path(str(tmp_path / 'out')), encoding='utf-8') as f:
    assert json.load(f)['shared_media'] == [{'field': 'image', 'path': path, 'instances': 12}]


def test_fields_nothing_reads_are_warned_about(catalogue, tmp_path, capsys):
  """An export that calls the caption "title" trains as products without captions, unless
  someone says so; a field kept for other uses ("price") is named too."""
  def renamed(r, i, root):
    r['title'] = r.pop('caption')
    return dict(r, price=9.5) if i % 2 else r
  _edited(catalogue, tmp_path / 'raw', renamed)
  build.main(['--raw', str(tmp_path / 'raw'), '--out', str(tmp_path / 'out'),
              '--vocab-size', '400', '--val-fraction', '0', '--workers', '1'])
  with open(build.report_path(str(tmp_path / 'out')), encoding='utf-8') as f:
    report = json.load(f)  # (products with a caption alone are left out: no usable modality)
  title, price = report['unread_fields']
  assert title == {'field': 'title', 'products': report['products'], 'meant': 'caption'}
  assert price['field'] == 'price' and price['meant'] is None
  assert (f'warning: fields nothing reads (docs/data.md names the fields): title '
          f'({report["products"]} products: the caption? name it "caption"), price '
          f'({price["products"]} products)' in capsys.readouterr().out)
  # A required field under another name: the broken line says which one it may be.
  path = tmp_path / 'manifest.jsonl'
  path.write_text('{"item_id": "p0", "category": "shoes", "caption": "x"}\n')
  problems = raw.Problems()
  with pytest.raises(raw.RawDataError, match='required field "label" is missing; the line has '
                                             '"category": if that is the label, name it "label"'):
    raw.read_manifest(str(path), problems)


def test_presence_index_matches_the_records(catalogue, tmp_path):
  def some_features(r, i, root):
    if i % 3 == 0:
      np.save(root / f'{i}.npy', np.ones((2, 8), np.float32))
      r['video_features'] = f'{i}.npy'
    return r
  _edited(catalogue, tmp_path / 'raw', some_features)
  out = str(tmp_path / 'out')
  _build(tmp_path / 'raw', out, val_fraction=0.15)
  records = _records(out)
  assert set(records) == {'train', 'validation', 'test'}
  for split, split_records in records.items():
    present, features_present = build.load_presence(out, split)
    assert present.dtype == features_present.dtype == np.bool_
    np.testing.assert_array_equal(present, np.stack([r['present'] for r in split_records]))
    np.testing.assert_array_equal(features_present,
                                  np.stack([r['features_present'] for r in split_records]))
  train_present, train_features_present = build.load_presence(out, 'train')
  assert not train_present.all() and train_features_present.any()  # not all the same
  os.remove(build.presence_path(out))
  with pytest.raises(FileNotFoundError, match=r'presence.npz: .*python -m scale_jax.data.build'):
    build.load_presence(out, 'train')
