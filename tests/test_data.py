import fractions
import gzip
import io
import json
import os
import shutil
import struct

import jax
import numpy as np
import pytest
import soundfile
from ml_collections import FrozenConfigDict

from scale_jax import modalities
from scale_jax.modalities import MODALITIES
from configs import tiny
from scale_jax.data import build, media, pipeline, raw, synthetic, tokenizer
from scale_jax.model.scale import Scale


def test_parse_table_official_string():
  assert raw.parse_table('color#:#red#;#size#:#XL') == [('color', 'red'), ('size', 'XL')]
  assert raw.parse_table('') == [] and raw.parse_table(None) == []
  with pytest.raises(ValueError, match='no "#:#"'):
    raw.parse_table('color=red')


def test_missing_manifest_names_the_file(tmp_path):
  with pytest.raises(raw.RawDataError, match=f'{tmp_path}/manifest.jsonl: manifest not found'):
    build.build(str(tmp_path), str(tmp_path / 'out'), progress=False)


def test_table_forms():
  assert raw.parse_table([['颜色', '红色'], ['size', 'XL']]) == [('颜色', '红色'), ('size', 'XL')]
  assert raw.parse_table({'size': 'XL'}) == [('size', 'XL')]
  for bad in ([['only a key']], 42, [[1, 'x']]):
    with pytest.raises(ValueError):
      raw.parse_table(bad)
  # Entries as objects: schema.org's PropertyValue (a scraped page's JSON-LD), {key, value}.
  assert raw.parse_table([{'@type': 'PropertyValue', 'name': 'color', 'value': 'red'},
                          {'key': 'size', 'value': 42},
                          {'attribute_name': 'fits', 'attribute_value': ['S', 'M']}]) == [
      ('color', 'red'), ('size', '42'), ('fits', 'S, M')]
  for ambiguous in ([{'name': 'color'}], [{'name': 'color', 'key': 'c', 'value': 'red'}]):
    with pytest.raises(ValueError, match='without one name field'):
      raw.parse_table(ambiguous)


def test_table_values_as_json_exports_write_them():
  """Several values of one property as a list, booleans, and pandas' integers with gaps."""
  assert raw.parse_table({'color': ['red', 'blue', None], 'weight (g)': 500.0, 'inch': 6.5,
                          'waterproof': True, 'sizes': [38, 39.0], 'fits': []}) == [
      ('color', 'red, blue'), ('weight (g)', '500'), ('inch', '6.5'), ('waterproof', 'true'),
      ('sizes', '38, 39')]
  for nested in ({'color': [['red']]}, {'color': {'main': 'red'}}):
    with pytest.raises(ValueError, match='is not text'):
      raw.parse_table(nested)


def test_table_gaps_and_blanks_are_left_out():
  assert raw.parse_table({'颜色': '白色', 'size': None, 'fit': float('nan')}) == [('颜色', '白色')]
  assert raw.parse_table('#:##;# #:# #;#size#:#XL') == [('size', 'XL')]
  assert raw.parse_table(float('nan')) == []


def _manifest(tmp_path, lines: list[bytes]) -> str:
  (tmp_path / 'a.jpg').write_bytes(b'not checked by read_manifest')
  path = tmp_path / 'manifest.jsonl'
  path.write_bytes(b'\n'.join(lines) + b'\n')
  return str(path)


def test_manifest_as_spreadsheet_tools_write_it(tmp_path):
  """A byte-order mark, NaN for an empty cell (Python's json writes pandas gaps so), a title that
  is a number and a caption of blanks: every product kept, nothing counted as a problem."""
  path = _manifest(tmp_path, [
      b'\xef\xbb\xbf{"item_id": "p0", "label": 1, "caption": "a red shoe", "instance_id": 7}',
      b'{"item_id": "p1", "label": 1.0, "caption": 501, "instance_id": NaN, "image": NaN}',
      b'{"item_id": "p2", "label": "1", "caption": " \xe3\x80\x80 ", "tabular": NaN, '
      b'"image": "a.jpg"}',
  ])
  problems = raw.Problems()
  products = {p['item_id']: p for p in raw.read_manifest(path, problems)}
  assert not problems and list(products) == ['p0', 'p1', 'p2']
  assert products['p0']['instance_id'] == '7' and products['p1']['instance_id'] is None
  assert products['p1']['caption'] == '501' and products['p1']['image'] is None
  assert {p['label'] for p in products.values()} == {'1'}
  assert not raw.has_modality(products['p2'], 'text')  # blanks (an ideographic space) only
  assert not raw.has_modality(products['p2'], 'table') and raw.has_modality(products['p2'], 'image')


def test_a_catalogue_cast_to_text_keeps_its_gaps(tmp_path):
  """pandas' astype(str) writes a missing cell as "nan" (or "None", "<NA>"): read as text, every
  product without an instance id would be one instance "nan", shared by listings of unrelated
  products, and "nan" a caption thousands of products share."""
  path = _manifest(tmp_path, [json.dumps(line).encode() for line in [
      {'item_id': 'p0', 'label': 'shoes', 'instance_id': 'nan', 'caption': 'NaN', 'image': 'a.jpg',
       'video': 'nan', 'tabular': {'color': 'nan', 'batteries': 'None', 'size': '<NA>'}},
      {'item_id': 'p1', 'label': 'shoes', 'instance_id': 'None', 'caption': 'red shoe',
       'tabular': 'nan', 'audio': 'None'},
      {'item_id': 'p2', 'label': 'nan', 'caption': 'x'},
  ]])
  problems = raw.Problems()
  p0, p1 = raw.read_manifest(path, problems)
  assert p0['instance_id'] is None and p1['instance_id'] is None  # each its own instance
  assert p0['caption'] == '' and p1['caption'] == 'red shoe'
  assert p0['tabular'] == [('batteries', 'None')]  # a value "None" is a value
  assert p1['tabular'] == [] and p0['video'] is None and p1['audio'] is None
  assert [(kind, reason) for kind, _, reason in problems.items] == [
      ('broken line', 'required field "label" is missing (it reads \'nan\': a missing cell)')]


def test_captions_in_several_languages_and_category_paths(tmp_path):
  """Multi-locale shop exports write a title per language, and a product's category as its path
  in the category tree: every language is read, and the whole path is the label (the same leaf
  under two branches is two categories)."""
  path = _manifest(tmp_path, [json.dumps(line).encode() for line in [
      {'item_id': 'p0', 'label': ['Clothing', 'Shoes'],
       'caption': {'en': 'red shoe', 'zh': '红鞋', 'de': None, 'fr': 'red shoe'}},
      {'item_id': 'p1', 'label': 'Clothing > Shoes', 'caption': ['red shoe', ' ', 'size 42']},
      {'item_id': 'p2', 'label': ['Sports', '', 'Shoes'], 'caption': {'en': {'short': 'shoe'}},
       'image': 'a.jpg'},
      {'item_id': 'p3', 'label': [['Sports']], 'caption': 'x'},
  ]])
  problems = raw.Problems()
  products = {p['item_id']: p for p in raw.read_manifest(path, problems)}
  assert products['p0']['caption'] == 'red shoe / 红鞋'  # gaps and repeats left out
  assert products['p1']['caption'] == 'red shoe / size 42'
  assert products['p0']['label'] == products['p1']['label'] == 'Clothing > Shoes'
  assert products['p2']['label'] == 'Sports > Shoes' and products['p2']['caption'] == ''
  assert dict(problems.counts) == {'undecodable text': 1, 'broken line': 1}  # p2's, p3
  assert [(kind, reason) for kind, _, reason in problems.items] == [
      ('undecodable text', 'caption holds a JSON dict, not text'),
      ('broken line', "label ['Sports'] is neither text nor an integer")]


def test_html_in_captions_and_tables_is_read_as_a_shop_shows_it(tmp_path):
  """Scraped and XML-exported catalogues escape `&` as `&amp;` (sometimes twice) and keep the
  description's <br>: the tokenizer should see "Tom & Jerry", not "amp"."""
  path = _manifest(tmp_path, [json.dumps({
      'item_id': 'p0', 'label': 1,
      'caption': 'Tom &amp; Jerry&#39;s mug<br/>red &amp;amp; blue <B>sale</b>',
      'tabular': {'size&nbsp;(cm)': '5&lt;6', 'brand': 'AT&T &notice; R&D'}}).encode()])
  [product] = raw.read_manifest(path)
  assert product['caption'] == "Tom & Jerry's mug red & blue  sale"
  # An & that begins no character reference HTML defines stays as written.
  assert product['tabular'] == [('size\u00a0(cm)', '5<6'), ('brand', 'AT&T &notice; R&D')]


def test_invisible_characters_do_not_cut_words(tmp_path):
  """A soft hyphen (German shops write "Kinder&shy;wagen"), a direction mark in Arabic or Hebrew
  text, a stray control or BOM: the tokenizer kept each as byte pieces inside the word."""
  path = _manifest(tmp_path, [json.dumps({
      'item_id': 'p0', 'label': 'Baby\u200e',
      'caption': 'Kinder&shy;wagen \u202bsale\u202c\x07 x\ufeffl 3\u2060kg',
      'tabular': [['Far\u00adbe', 'rot\x00'], ['size', '\u2066XL\u2069']]}).encode()])
  [product] = raw.read_manifest(path)
  assert product['caption'] == 'Kinderwagen sale xl 3kg'
  assert product['tabular'] == [('Farbe', 'rot'), ('size', 'XL')]
  assert product['label'] == 'Baby'
  # Word breaks stay (the tokenizer reads them as spaces), and so do tabs and newlines.
  for text in ['\u0645\u06cc\u200c\u062e\u0648\u0627\u0645', 'a\u200bb', 'a\tb']:
    assert raw.plain_text(text) == text


def test_mojibake_is_read_as_it_was_written():
  """UTF-8 misread as Windows-1252 or Latin-1 (once or twice) on its way into a catalogue, as
  open_clip's ftfy mends it; text as people type it, in any script, is left alone."""
  written = ['café naïve “quoted” it’s ®°', 'Größe 42', '红色连衣裙 女 夏季', 'Ça – £5']
  for text in written:
    assert raw.plain_text(text) == text
    once = text.encode('utf-8').decode('latin-1')
    assert raw.plain_text(once) == text
    # Windows-1252 as Windows misreads it: the five bytes it leaves undefined as Latin-1's.
    as_windows = ''.join(bytes([b]).decode('cp1252', errors='ignore') or chr(b)
                         for b in text.encode('utf-8'))
    assert raw.plain_text(as_windows) == text
    assert raw.plain_text(once.encode('utf-8').decode('latin-1')) == text
  for typed in ['Ã', 'ÂÂ', 'naïve Ã©', '×÷ µ¶ §¿']:  # not all valid UTF-8 read as Latin-1
    assert raw.plain_text(typed) == typed


def test_media_paths_written_on_windows_name_the_same_files(tmp_path):
  (tmp_path / 'videos').mkdir()
  (tmp_path / 'videos' / 'v.mp4').write_bytes(b'not checked by read_manifest')
  path = _manifest(tmp_path, [
      rb'{"item_id": "p0", "label": 1, "video": "videos\\v.mp4", "audio": "videos/v.mp4"}',
      rb'{"item_id": "p1", "label": 1, "video": ".\\videos\\v.mp4", "image": "a.jpg"}',
  ])
  problems = raw.Problems()
  p0, p1 = raw.read_manifest(path, problems)
  assert not problems
  assert p0['video'] == p1['video'] == str(tmp_path / 'videos' / 'v.mp4')
  assert p0['audio_in_video']  # one file, however its two paths are written
  # A catalogue made on Windows or macOS, whose file systems compare names without letter case
  # and Unicode form (macOS stores "é" as e + accent), names its files as they compare there.
  (tmp_path / 'Images').mkdir()
  for name in ('IMG_01.JPG', 'cafe\u0301.jpg', 'b.JPG', 'B.jpg'):
    (tmp_path / 'Images' / name).write_bytes(b'not checked by read_manifest')
  found = raw.read_manifest(_manifest(tmp_path, [json.dumps(line).encode() for line in [
      {'item_id': 'p3', 'label': 1, 'image': 'images/img_01.jpg', 'video': 'Images\\Caf\u00e9.JPG'},
      {'item_id': 'p4', 'label': 1, 'image': 'images/b.jpg', 'caption': 'x'}]]), problems)
  assert found[0]['image'] == str(tmp_path / 'Images' / 'IMG_01.JPG')
  assert found[0]['video'] == str(tmp_path / 'Images' / 'cafe\u0301.jpg')
  assert found[1]['image'] is None  # b.JPG or B.jpg: which one is not for us to guess
  assert [kind for kind, _, _ in problems.items] == ['missing file']
  problems = raw.Problems()
  # A gallery, as scraped pages list a product's pictures: the first one is its main image.
  gallery = raw.read_manifest(_manifest(tmp_path, [json.dumps(line).encode() for line in [
      {'item_id': 'p5', 'label': 1, 'image': [None, '', 'a.jpg', 'videos/v.mp4']},
      {'item_id': 'p6', 'label': 1, 'image': [{'src': 'a.jpg'}], 'caption': 'x'}]]), problems)
  assert gallery[0]['image'] == str(tmp_path / 'a.jpg') and gallery[1]['image'] is None
  assert [reason for _, _, reason in problems.items] == ['image is a JSON dict, not a path']
  problems = raw.Problems()
  # A local file as a URI (percent-encoded), as some exports write its path.
  (tmp_path / 'videos' / 'a b.jpg').write_bytes(b'not checked by read_manifest')
  uri = (tmp_path / 'videos' / 'a b.jpg').as_uri()
  assert '%20' in uri
  [p2] = raw.read_manifest(_manifest(tmp_path, [json.dumps(
      {'item_id': 'p2', 'label': 1, 'image': uri}).encode()]), problems)
  assert not problems and p2['image'] == str(tmp_path / 'videos' / 'a b.jpg')


def test_a_manifest_with_nothing_usable_names_the_first_problem(tmp_path):
  path = _manifest(tmp_path, [b'{"item_id": "p0", "caption": "no label"}', b'[1, 2]'])
  with pytest.raises(raw.RawDataError) as error:
    raw.read_manifest(path, raw.Problems())
  assert str(error.value) == (f'{path}: manifest has no usable products (2 broken line; the '
                              f'first: {path}:1: required field "label" is missing)')


def test_a_gzipped_manifest_and_a_json_array_read_as_the_lines_would(tmp_path):
  lines = [b'\xef\xbb\xbf{"item_id": "p0", "label": 1, "caption": "a red shoe"}',
           b'{"item_id": "p1", "label": 2, "caption": "caf\xc3\xa9 \xff", "image": "a.jpg"}']
  plain = raw.read_manifest(_manifest(tmp_path, lines), raw.Problems())
  gzipped = tmp_path / 'gz' / 'manifest.jsonl.gz'
  gzipped.parent.mkdir()
  (gzipped.parent / 'a.jpg').write_bytes(b'x')
  gzipped.write_bytes(gzip.compress(b'\n'.join(lines)))
  array = tmp_path / 'array' / 'products.json'
  array.parent.mkdir()
  (array.parent / 'a.jpg').write_bytes(b'x')
  array.write_bytes(b'[\n  ' + b',\n  '.join(line.removeprefix(b'\xef\xbb\xbf')
                                            for line in lines) + b'\n]\n')
  strip = lambda products: [{k: v for k, v in p.items() if k not in ('where', 'image')}
                            for p in products]
  for path in (raw.manifest_path(str(gzipped.parent)), str(array)):
    problems = raw.Problems()
    products = raw.read_manifest(path, problems)
    assert strip(products) == strip(plain), path
    assert products[1]['image'] is not None
    assert problems.counts['undecodable text'] == 1  # the \xff, as in the plain manifest
  assert products[1]['where'] == f'{array}: array element 2'
  array.write_bytes(b'[{"item_id": "p0", "label": 1},\n')
  with pytest.raises(raw.RawDataError, match='starts as a JSON array but does not parse'):
    raw.read_manifest(str(array), raw.Problems())


def test_a_manifest_in_utf16_is_read(tmp_path):
  """Windows PowerShell's `>` and Out-File write UTF-16 (a byte-order mark first)."""
  lines = ['{"item_id": "p0", "label": "café", "caption": "红鞋"}', '{"item_id": "p1", "label": 2}']
  for encoding in ('utf-16-le', 'utf-16-be'):
    bom = '\ufeff'.encode(encoding)
    (tmp_path / 'manifest.jsonl').write_bytes(bom + '\r\n'.join(lines).encode(encoding))
    problems = raw.Problems()
    products = raw.read_manifest(str(tmp_path / 'manifest.jsonl'), problems)
    assert not problems and [p['item_id'] for p in products] == ['p0', 'p1']
    assert products[0]['label'] == 'café' and products[0]['caption'] == '红鞋'


def test_a_manifest_in_another_format_says_how_to_convert_it(tmp_path):
  """A catalogue kept in pandas is saved as CSV or Parquet more often than as JSON lines."""
  for name, content, says in [
      ('m.csv', b'"item_id",caption,label\np0,a red shoe,1\n', 'a CSV file'),
      ('m.tsv', b'item_id\tcaption\tlabel\np0\ta red shoe\t1\n', 'a TSV file'),
      ('m.parquet', b'PAR1\x15\x04\x15\x10\n\x00', 'a Parquet file'),
      ('m.xlsx', b'PK\x03\x04\x14\x00\n\x00', 'a zip archive')]:
    (tmp_path / name).write_bytes(content)
    path = str(tmp_path / name)
    with pytest.raises(raw.RawDataError) as error:
      raw.read_manifest(path)
    assert str(error.value).startswith(f'{path}: a manifest is JSON lines (docs/data.md), this '
                                       f'is {says}')
    assert '.to_json("manifest.jsonl", orient="records", lines=True' in str(error.value)
  # A JSONL manifest whose first line is broken is read on: that line counted, the rest kept.
  path = _manifest(tmp_path, [b'{"item_id": "cut', b'{"item_id": "p0", "label": 1, "caption": "x"}'])
  problems = raw.Problems()
  assert [p['item_id'] for p in raw.read_manifest(path, problems)] == ['p0']
  assert dict(problems.counts) == {'broken line': 1}


def test_a_file_that_cannot_be_read_says_why(tmp_path):
  (tmp_path / 'a_directory.jpg').mkdir()
  path = _manifest(tmp_path, [
      b'{"item_id": "p0", "label": 1, "caption": "x", "image": "https://shop.example/1.jpg"}',
      b'{"item_id": "p1", "label": 1, "caption": "x", "image": "a_directory.jpg"}',
      b'{"item_id": "p2", "label": 1, "caption": "x", "image": "nope.jpg"}',
      b'{"item_id": "p3", "label": 1, "caption": "x", "image": "data:image/gif;base64,' +
      b'R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7"}'])
  problems = raw.Problems()
  raw.read_manifest(path, problems)
  reasons = [reason for _, _, reason in problems.items]
  assert reasons == [
      f'image file named on {path}:1: a https:// address: media are local files, relative to '
      f'the manifest (download them first)',
      f'image file named on {path}:2: a directory, not a file',
      f'image file named on {path}:3: does not exist',
      f'image file named on {path}:4: a data: URI, the file inline (scraped pages put a '
      f'lazy-loading placeholder there): media are local files, write it to one']
  assert problems.items[3][1] == 'data:image/gif;base64,R0lGODlhAQABAIAAAA...'
  (tmp_path / 'empty.jpg').write_bytes(b'')
  (tmp_path / 'text.jpg').write_bytes(b'<html>not an image</html>')
  sound = io.BytesIO()
  soundfile.write(sound, np.zeros(8000, np.float32), 16000, format='WAV')
  (tmp_path / 'sound.mp4').write_bytes(sound.getvalue())  # a sound file named as a video
  product = dict(item_id='p', where='line 1', **{f: None for f in raw.MEDIA},
                 **{f: None for f in raw.FEATURE_FIELDS.values()})
  product.update(image=str(tmp_path / 'empty.jpg'), video=str(tmp_path / 'sound.mp4'))
  _, found, _ = build.check_files(product)
  product.update(image=str(tmp_path / 'text.jpg'), video=None)
  _, more, _ = build.check_files(product)
  reasons = {kind: reason for kind, _, reason in found + more}
  assert reasons['corrupt image'].startswith('cannot decode image: it is an HTML page')
  assert [r for k, _, r in found if k == 'corrupt image'] == [
      'the file is empty (0 bytes) (image of line 1)']
  assert reasons['corrupt video'] == ('cannot decode video: no video stream in the file (it holds '
                                      'only sound) (video of line 1)')


def tiny_config(data_dir):
  c = tiny.get_config()
  c.data.dir = data_dir
  return c


def _sound_video(root, name):
  """An MP4 whose sound track is a 440 Hz tone."""
  t = np.arange(16000) / 16000
  data = synthetic.encode_mp4(np.full((2, 16, 16, 3), 128, np.uint8), 2,
                              audio=0.5 * np.sin(2 * np.pi * 440 * t))
  (root / name).write_bytes(data)
  return name


# Each corruption: (what it does to a manifest record, the problem kind counted, the modality
# that must end up absent; None: the line/product is skipped).
def _truncate(field, fraction):
  def edit(r, root):
    path = root / r[field]
    path.write_bytes(path.read_bytes()[:int(len(path.read_bytes()) * fraction)])
  return edit


def _replace(field, value):
  def edit(r, root):
    r[field] = value
  return edit


def _write(field, name, data):
  def edit(r, root):
    (root / name).write_bytes(data)
    r[field] = name
  return edit


def _nan_features(r, root):
  np.save(root / 'nan.npy', np.full((3, 8), np.nan, np.float32))
  r['image_features'] = 'nan.npy'


def _silent_wav() -> bytes:
  """Two seconds of digital silence, as a muted video's sound track decodes."""
  buf = io.BytesIO()
  soundfile.write(buf, np.zeros(32000, np.float32), 16000, format='WAV')
  return buf.getvalue()


def _nothing_left(r, root):
  r.update(caption='', tabular=None, image=None, video=None, audio='missing.wav')


CORRUPTIONS = {
    'corrupt jpeg': (_truncate('image', 0.3), 'corrupt image', 'image'),
    'truncated mp4': (_truncate('video', 0.5), 'corrupt video', 'video'),
    'empty audio': (_write('audio', 'empty.wav', b''), 'corrupt audio', 'audio'),
    'corrupt audio': (_write('audio', 'noise.wav', b'RIFF\x00\x01garbage' * 8), 'corrupt audio',
                      'audio'),
    'silent audio': (_write('audio', 'silent.wav', _silent_wav()), 'silent audio', 'audio'),
    'missing file': (_replace('image', 'images/nope.jpg'), 'missing file', 'image'),
    'malformed table': (_replace('tabular', 'color=red'), 'malformed table', 'table'),
    'undecodable text': (_replace('caption', 'UNDECODABLE'), 'undecodable text', 'text'),
    'broken line': (None, 'broken line', None),
    'nan features': (_nan_features, 'corrupt features', None),
    'no usable modality': (_nothing_left, 'no usable modality', None),
}


def _corrupt_catalogue(raw_dir, root, kinds):
  """A copy of the catalogue whose line i gets the i-th corruption of `kinds`. Returns the
  original records."""
  shutil.copytree(raw_dir, root)
  lines = (root / 'manifest.jsonl').read_text(encoding='utf-8').splitlines()
  originals = [json.loads(line) for line in lines]
  donor = next(r for r in originals if all(r[f] for f in raw.MEDIA))
  out = [line.encode('utf-8') for line in lines]
  for i, kind in enumerate(kinds):
    record = dict(originals[i], image=f'images/{originals[i]["item_id"]}.jpg',
                  video=f'videos/{originals[i]["item_id"]}.mp4',
                  audio=f'audio/{originals[i]["item_id"]}.wav', caption='a caption',
                  tabular='colour#:#red')  # every modality present before the corruption
    for field in raw.MEDIA:
      if not (root / record[field]).exists():  # the generator left it out: borrow the donor's
        shutil.copy(root / donor[field], root / record[field])
    edit = CORRUPTIONS[kind][0]
    if edit is None:
      out[i] = b'{"item_id": "' + record['item_id'].encode() + b'", '
      continue
    edit(record, root)
    out[i] = json.dumps(record, ensure_ascii=False).encode('utf-8').replace(
        b'UNDECODABLE', b'caf\xe9 \xff\xfe')  # Latin-1 bytes, not UTF-8
  (root / 'manifest.jsonl').write_bytes(b'\n'.join(out) + b'\n')
  return originals


def _built_products(data_dir):
  products = {}
  for split in ('train', 'test'):
    source = pipeline.open_split(data_dir, split)
    for i in range(len(source)):
      ex = source[i]
      products[pipeline._item_id(ex)] = ex
  return products


def test_bad_input_is_counted_and_the_product_kept(raw_dir, tmp_path):
  kinds = list(CORRUPTIONS)
  originals = _corrupt_catalogue(raw_dir, tmp_path / 'raw', kinds)
  problems = build.build(str(tmp_path / 'raw'), str(tmp_path / 'out'), vocab_size=400,
                         progress=False, workers=2)
  expected = {}
  for kind in kinds:
    expected[CORRUPTIONS[kind][1]] = expected.get(CORRUPTIONS[kind][1], 0) + 1
  expected['missing file'] += 1  # the product with nothing left also named a missing file
  assert dict(problems.counts) == expected
  assert 'corrupt audio' in problems.summary() and '2 corrupt audio' in problems.summary()
  with open(build.report_path(str(tmp_path / 'out')), encoding='utf-8') as f:
    report = json.load(f)
  assert report['problems'] == expected and len(report['details']) == sum(expected.values())
  assert any(d['where'].endswith('images/nope.jpg') for d in report['details'])

  products = _built_products(str(tmp_path / 'out'))
  assert len(products) == len(originals) - 2  # the broken line and the empty product skipped
  for i, kind in enumerate(kinds):
    _, _, absent = CORRUPTIONS[kind]
    item_id = originals[i]['item_id']
    if kind in ('broken line', 'no usable modality'):
      assert item_id not in products
      continue
    present = dict(zip(MODALITIES, products[item_id]['present']))
    assert present == {m: m != absent for m in MODALITIES}, kind
    if kind == 'nan features':
      assert not products[item_id]['features_present'].any()


@pytest.mark.parametrize('kind', ['corrupt jpeg', 'truncated mp4', 'empty audio', 'missing file',
                                  'malformed table', 'undecodable text', 'broken line'])
def test_strict_stops_at_the_first_problem_naming_the_file(raw_dir, tmp_path, kind):
  _corrupt_catalogue(raw_dir, tmp_path / 'raw', [kind])
  with pytest.raises(raw.RawDataError) as error:
    build.build(str(tmp_path / 'raw'), str(tmp_path / 'out'), progress=False, strict=True)
  message = str(error.value)
  names_file = {'corrupt jpeg': '.jpg: cannot decode image', 'truncated mp4': '.mp4: cannot decode',
                'empty audio': 'empty.wav: ', 'missing file': 'images/nope.jpg: image file'}
  assert names_file.get(kind, 'manifest.jsonl:1: ') in message, message
  assert not os.path.exists(build.dataset_dir(str(tmp_path / 'out')))


def test_rebuild_gives_the_same_dataset(raw_dir, data_dir, tmp_path):
  out = tmp_path / 'again'
  shutil.copytree(data_dir, out)
  fractions = dict(test_fraction=0.2, val_fraction=0.2)  # as tests/conftest.py builds data_dir
  build.build(raw_dir, str(out), vocab_size=400, progress=False, **fractions)
  build.build(raw_dir, str(out), vocab_size=400, progress=False, **fractions)  # over itself
  with open(build.tokenizer_path(data_dir), 'rb') as a, open(build.tokenizer_path(out), 'rb') as b:
    assert a.read() == b.read()
  for split in ('train', 'validation', 'test'):
    first, second = pipeline.open_split(data_dir, split), pipeline.open_split(str(out), split)
    assert len(first) == len(second)
    for i in range(len(first)):
      x, y = first[i], second[i]
      for k in x:
        assert np.array_equal(x[k], y[k]), (split, i, k)


def test_chinese_text_pairs_table_and_a_videos_sound_track(raw_dir, tmp_path):
  root = tmp_path / 'raw'
  shutil.copytree(raw_dir, root)
  lines = (root / 'manifest.jsonl').read_text(encoding='utf-8').splitlines()
  record = json.loads(lines[0])
  video = _sound_video(root, 'sound.mp4')
  record.update(caption='纯棉 T恤 男款 夏季', tabular=[['颜色', '白色'], ['尺码', 'XL']],
                video=video, audio=video)
  lines[0] = json.dumps(record, ensure_ascii=False)
  (root / 'manifest.jsonl').write_text('\n'.join(lines) + '\n', encoding='utf-8')
  out = str(tmp_path / 'out')
  assert not build.build(str(root), out, vocab_size=400, progress=False)
  ex = _built_products(out)[record['item_id']]
  tok = tokenizer.load_tokenizer(build.tokenizer_path(out))
  assert tok.decode(ex['caption_tokens'].tolist()) == record['caption']
  assert tok.decode(ex['table_tokens'][ex['table_entities'] == 3].tolist()) == '尺码'
  assert ex['audio_in_video'] and ex['present'].all()
  cfg = pipeline._plain(tiny_config(out))
  batch = pipeline.Preprocess(cfg).map(ex)
  assert batch['audio_valid'].all() and batch['video_valid'][0]
  spec = batch['audio_input']
  assert np.abs(spec).max() > 0  # the 440 Hz track, standardised


def test_features_mode(raw_dir, tmp_path):
  root = tmp_path / 'raw'
  shutil.copytree(raw_dir, root)
  lines = (root / 'manifest.jsonl').read_text(encoding='utf-8').splitlines()
  rng = np.random.default_rng(0)
  features = {}
  for i in range(0, len(lines), 2):  # every other product brings pre-extracted image features
    record = json.loads(lines[i])
    features[record['item_id']] = rng.normal(size=(int(rng.integers(2, 7)), 24)).astype(
        np.float32)
    np.save(root / f'{record["item_id"]}.npy', features[record['item_id']])
    record['image_features'] = f'{record["item_id"]}.npy'
    lines[i] = json.dumps(record, ensure_ascii=False)
  (root / 'manifest.jsonl').write_text('\n'.join(lines) + '\n', encoding='utf-8')
  out = str(tmp_path / 'out')
  build.build(str(root), out, vocab_size=400, progress=False)
  config = tiny_config(out)
  config.image.update(source='features', feature_tokens=4, feature_dim=24)
  assert modalities.token_counts(config)['image'] == 5
  assert modalities.get('image').patch_dim(config.image) == 24
  source = pipeline.open_split(out, 'train')
  preprocess = pipeline.Preprocess(pipeline._plain(config))
  image = MODALITIES.index('image')
  seen = 0
  for i in range(len(source)):
    ex = preprocess.map(source[i])
    stored = features.get(pipeline._item_id(source[i]))
    assert ex['present'][image] == (stored is not None)
    if stored is not None:
      n = min(len(stored), 4)
      np.testing.assert_array_equal(ex['image_input'][:n], stored[:n])
      assert ex['image_valid'].sum() == n and not ex['image_input'][n:].any()
      seen += 1
  assert seen > 10
  batch = next(iter(pipeline.train_dataset(config)))
  spec = modalities.dummy_batch(config, config.batch_size)
  assert {k: v.shape for k, v in batch.items()} == {k: v.shape for k, v in spec.items()}
  # The model embeds and regresses the 24-wide rows.
  model = Scale(FrozenConfigDict(config))
  params = jax.eval_shape(model.init, jax.random.key(0), batch)['params']
  assert params['patch_embed_image']['kernel'].value.shape == (24, config.model.width)
  config.image.feature_dim = 16
  with pytest.raises(ValueError, match='image features have 24 values per token but '
                                       'config.image.feature_dim is 16'):
    for i in range(len(source)):
      pipeline.Preprocess(pipeline._plain(config)).map(source[i])
  with pytest.raises(ValueError, match='image features have 24 values per token but '
                                       'config.image.feature_dim is 16'):
    pipeline.train_dataset(config)  # found when the dataset is made, before anything is read


def test_frame_conversion_matches_ffmpeg():

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


def _encoded(img, fmt, **kwargs) -> bytes:
  buf = io.BytesIO()
  img.save(buf, fmt, **kwargs)
  return buf.getvalue()


def test_images_are_read_as_the_shop_shows_them():
  from PIL import Image
  halves = np.zeros((16, 16, 3), np.uint8)
  halves[:, :8] = [255, 0, 0]  # red | green
  upright = media.decode_image(_encoded(Image.fromarray(halves), 'PNG'), 4)
  # A camera stores its sensor's rows and says in EXIF how to turn them (3: by 180 degrees).
  exif = Image.Exif()
  exif[0x0112] = 3
  turned = _encoded(Image.fromarray(halves[::-1, ::-1].copy()), 'PNG', exif=exif.tobytes())
  np.testing.assert_allclose(media.decode_image(turned, 4), upright, atol=1e-6)
  # A cut-out: red on transparent pixels that store black. Shops show it over white.
  cutout = np.zeros((16, 16, 4), np.uint8)
  cutout[:, :8] = [255, 0, 0, 255]
  over_white = media.decode_image(_encoded(Image.fromarray(cutout, 'RGBA'), 'PNG'), 4)
  np.testing.assert_allclose(over_white[:, -1], 1.0)
  np.testing.assert_allclose(over_white[:, 0], [[1, 0, 0]] * 4)
  palette = Image.fromarray((np.arange(16)[None] < 8).repeat(16, 0).astype(np.uint8), 'P')
  palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)  # index 0 (right) transparent black
  np.testing.assert_allclose(
      media.decode_image(_encoded(palette, 'PNG', transparency=0), 4), over_white, atol=1e-6)
  # 16-bit grey, read as 8 bits would show it, not clipped at 255.
  grey = np.linspace(0, 65535, 16)[None].repeat(16, 0).astype(np.uint16)
  eight_bit = Image.fromarray((grey // 257).astype(np.uint8)).convert('RGB')
  np.testing.assert_allclose(media.decode_image(_encoded(Image.fromarray(grey), 'PNG'), 4),
                             media.decode_image(_encoded(eight_bit, 'PNG'), 4), atol=1 / 255)
  # Float grey (a scanner's or a raw converter's TIFF), 0..1 as float images hold it, or the
  # 8- or 16-bit levels stored as floats: the same picture, not black.
  expected = media.decode_image(_encoded(eight_bit, 'PNG'), 4)
  for white in (1.0, 255.0, 65535.0):
    floats = Image.fromarray((grey / 65535.0 * white).astype(np.float32), 'F')
    np.testing.assert_allclose(media.decode_image(_encoded(floats, 'TIFF'), 4), expected,
                               atol=1 / 255)


def test_a_jpeg_cut_short_at_its_end_is_read_as_far_as_it_goes():
  """An interrupted download or a camera's write leaves a JPEG without its last bytes (the end
  marker, the end of the last row of blocks); a browser shows it whole, Pillow refused it."""
  from PIL import Image
  rows, columns = np.mgrid[0:400, 0:600]
  photo = Image.fromarray(np.stack([columns * 255 // 600, rows * 255 // 400,
                                    (rows + columns) % 256], -1).astype(np.uint8))
  for progressive in (False, True):
    data = _encoded(photo, 'JPEG', quality=90, progressive=progressive)
    whole = media.decode_image(data, 64)
    np.testing.assert_array_equal(media.decode_image(data[:-2], 64), whole)  # no end marker
    # The last 20 bytes lost: at most the last row of blocks (16 px of 400) partly grey.
    np.testing.assert_allclose(media.decode_image(data[:-20], 64)[:-4], whole[:-4], atol=2 / 255)
  # Cut in half, a baseline JPEG has lost the bottom half of its rows: corrupt, and it says so.
  data = _encoded(photo, 'JPEG', quality=90)
  with pytest.raises(media.MediaError, match=r'cut short, the bottom \d+ of its 200 rows'):
    media.decode_image(data[:len(data) // 2], 64)


def _display_profile(columns, gamma: float) -> bytes:
  """An ICC v2 display profile: RGB colorants (the D50 XYZ of full red, green and blue) and one
  gamma for all three channels, laid out as the ICC specification says."""
  def s15(x):
    return struct.pack('>i', round(x * 65536))

  def xyz(v):
    return b'XYZ \0\0\0\0' + b''.join(map(s15, v))

  d50, name = (0.9642, 1.0, 0.8249), b'test RGB\0'
  curve = b'curv\0\0\0\0' + struct.pack('>IH', 1, round(gamma * 256))
  tags = [(b'desc', b'desc\0\0\0\0' + struct.pack('>I', len(name)) + name + b'\0' * 79),
          (b'wtpt', xyz(d50)), (b'cprt', b'text\0\0\0\0none\0'),
          *zip((b'rXYZ', b'gXYZ', b'bXYZ'), map(xyz, columns)),
          *((sig, curve) for sig in (b'rTRC', b'gTRC', b'bTRC'))]
  offset, table, body = 128 + 4 + 12 * len(tags), b'', b''
  for sig, data in tags:
    data += b'\0' * (-len(data) % 4)
    table += sig + struct.pack('>II', offset + len(body), len(data))
    body += data
  header = (struct.pack('>I', offset + len(body)) + b'\0' * 4 + bytes([2, 0x10, 0, 0]) +
            b'mntrRGB XYZ ' + b'\0' * 12 + b'acsp' + b'\0' * 28 + b''.join(map(s15, d50)) +
            b'\0' * 48)
  return header + struct.pack('>I', len(tags)) + table + body


def test_image_colours_are_converted_to_srgb_by_their_embedded_profile():
  from PIL import Image, ImageCms
  # Adobe RGB (1998) and sRGB: their D50 colorants (ICC) and sRGB's encoding.
  adobe = np.array([(0.6097, 0.3111, 0.0195), (0.2053, 0.6257, 0.0609),
                    (0.1492, 0.0632, 0.7446)]).T
  srgb = np.array([(0.4361, 0.2225, 0.0139), (0.3851, 0.7169, 0.0971),
                   (0.1431, 0.0606, 0.7141)]).T
  profile = _display_profile(adobe.T, 563 / 256)
  for stored in ([60, 160, 60], [200, 120, 40], [128, 128, 128]):
    linear = np.clip(np.linalg.solve(srgb, adobe @ (np.array(stored) / 255) ** (563 / 256)), 0, 1)
    shown = np.where(linear <= 0.0031308, 12.92 * linear, 1.055 * linear ** (1 / 2.4) - 0.055)
    img = Image.new('RGB', (16, 16), tuple(stored))
    for fmt in ('PNG', 'JPEG'):
      tolerance = 2 / 255 if fmt == 'PNG' else 4 / 255  # JPEG: its own rounding on top
      decoded = media.decode_image(_encoded(img, fmt, icc_profile=profile), 4)
      np.testing.assert_allclose(decoded, np.broadcast_to(shown, decoded.shape), atol=tolerance)
      # Without a profile, or with one that cannot be read, the colours are taken as sRGB.
      for icc in ({}, {'icc_profile': b'not a colour profile'}):
        np.testing.assert_allclose(media.decode_image(_encoded(img, fmt, **icc), 4),
                                   np.broadcast_to(np.array(stored) / 255, decoded.shape),
                                   atol=tolerance)
  # An sRGB profile (most JPEGs embed one) changes nothing, so no transform is paid for.
  srgb_profile = ImageCms.ImageCmsProfile(ImageCms.createProfile('sRGB')).tobytes()
  assert media._srgb_transform(srgb_profile, 'RGB') is None
  assert media._srgb_transform(profile, 'RGB') is not None
  # An RGB profile on a grey image does not fit it: ignored, as a browser does.
  grey = Image.new('L', (16, 16), 90)
  np.testing.assert_allclose(media.decode_image(_encoded(grey, 'PNG', icc_profile=profile), 4),
                             90 / 255, atol=1e-6)


def test_a_large_jpeg_decodes_at_a_reduced_scale_to_the_same_pixels():
  """The DCT-scaled decode (draft) against the whole decode, resized alike: a photo-like image
  (smooth shapes and sensor noise), 800 px, at the paper's 192 and the demo's 32."""

  from PIL import Image
  rng = np.random.default_rng(0)
  x = np.linspace(0, 1, 800)
  smooth = np.stack([np.sin(8 * x)[None] * np.cos(5 * x)[:, None], np.outer(x, x),
                     np.sin(20 * np.outer(x, 1 - x))], -1) * 127 + 128
  photo = np.clip(smooth + rng.normal(0, 8, smooth.shape), 0, 255).astype(np.uint8)
  data = _encoded(Image.fromarray(photo), 'JPEG', quality=90)
  for size in (192, 32):
    opened = Image.open(io.BytesIO(data))
    opened.draft(None, (2 * size, 2 * size))
    assert opened.size[0] < 800  # the reduced decode is what is measured here
    whole = Image.open(io.BytesIO(data)).convert('RGB').resize((size, size), Image.BILINEAR)
    diff = np.abs(media.decode_image(data, size) - np.asarray(whole, np.float32) / 255)
    assert diff.mean() < 1 / 255 and diff.max() <= 4 / 255, (size, diff.mean(), diff.max())


def test_videos_are_turned_by_their_display_matrix():

  import av
  halves = np.zeros((16, 24, 3), np.uint8)
  halves[:, :12] = [255, 0, 0]  # a landscape frame, red | green

  def mp4(rotation):
    buf = io.BytesIO()
    with av.open(buf, 'w', format='mp4') as container:
      stream = container.add_stream('libx264', rate=2)
      stream.height, stream.width, stream.pix_fmt = 16, 24, 'yuv420p'
      if rotation:
        stream.set_display_rotation(rotation)  # degrees counterclockwise, as PyAV reads it back
      for _ in range(2):
        container.mux(stream.encode(av.VideoFrame.from_ndarray(halves, format='rgb24')))
      container.mux(stream.encode())
    return buf.getvalue()

  stored, _ = media.decode_video(mp4(0), 2, 8, fps=2.0)
  assert stored[0, :, 0, 0].min() > 0.9 and stored[0, :, -1, 0].max() < 0.1  # red on the left
  for rotation in (90, -90, 180):
    shown, count = media.decode_video(mp4(rotation), 2, 8, fps=2.0)
    assert count == 2
    np.testing.assert_allclose(shown, np.rot90(stored, rotation // 90, axes=(1, 2)), atol=1e-6)
  assert media.decode_video(mp4(90), 2, 8, fps=2.0)[0][0, -1, :, 0].min() > 0.9  # red below


def _solid_mp4(signal, matrix, height=16, width=16, **tags) -> bytes:
  """Two frames of one colour, `signal` (non-linear RGB in [0, 1]) in YUV by `matrix` (Kr, Kb),
  limited range; `tags` (colorspace, color_trc, color_primaries: FFmpeg's numbers) on the
  stream."""
  import av
  kr, kb = matrix
  luma = kr * signal[0] + (1 - kr - kb) * signal[1] + kb * signal[2]
  yuv = np.empty((height * 3 // 2, width), np.uint8)  # yuv420p
  yuv[:height] = round(16 + 219 * luma)
  yuv[height:height * 5 // 4] = round(128 + 224 * (signal[2] - luma) / (2 * (1 - kb)))
  yuv[height * 5 // 4:] = round(128 + 224 * (signal[0] - luma) / (2 * (1 - kr)))
  buf = io.BytesIO()
  with av.open(buf, 'w', format='mp4') as container:
    stream = container.add_stream('libx264', rate=2)
    stream.height, stream.width, stream.pix_fmt = height, width, 'yuv420p'
    for name, value in tags.items():
      setattr(stream.codec_context, name, value)
    for _ in range(2):
      frame = av.VideoFrame.from_ndarray(yuv, format='yuv420p')
      for name, value in tags.items():
        setattr(frame, name, value)
      container.mux(stream.encode(frame))
    container.mux(stream.encode())
  return buf.getvalue()


_BT601, _BT709, _BT2020 = (0.299, 0.114), (0.2126, 0.0722), (0.2627, 0.0593)


def test_video_colours_are_read_by_the_streams_yuv_matrix():
  """BT.709 (HD, phones) and BT.601 turn RGB into YUV differently; a stream says which, and an
  untagged one is read as players read it: BT.709 from 1280 x 720 on."""
  colour = np.array([200, 60, 40]) / 255
  for matrix, tag, height, width in [(_BT709, 1, 16, 16), (_BT601, 5, 720, 1280),
                                     (_BT601, None, 16, 16), (_BT709, None, 720, 1280)]:
    tags = {} if tag is None else {'colorspace': tag}
    shown, _ = media.decode_video(_solid_mp4(colour, matrix, height, width, **tags), 1, 4,
                                  fps=2.0)
    np.testing.assert_allclose(shown[0], np.broadcast_to(colour, (4, 4, 3)), atol=3 / 255,
                               err_msg=f'{matrix} tagged {tag}, {width} x {height}')


def _pq_signal(nits):
  """SMPTE ST 2084 (HDR10): display light in nits -> signal."""
  m1, m2, c1, c2, c3 = 2610 / 16384, 2523 / 4096 * 128, 3424 / 4096, 2413 / 128, 2392 / 128
  y = (np.asarray(nits, float) / 10000) ** m1
  return ((c1 + c2 * y) / (1 + c3 * y)) ** m2


def _hlg_signal(nits):
  """ARIB STD-B67 (HLG) on a 1000-nit screen: display light of an RGB colour in nits -> signal
  (the inverse OOTF, then the OETF)."""
  nits = np.asarray(nits, float)
  luma = nits @ np.array([0.2627, 0.6780, 0.0593])  # BT.2020's
  scene = nits / 1000 / (luma / 1000) ** (0.2 / 1.2)
  a, b, c = 0.17883277, 0.28466892, 0.55991073
  log_part = a * np.log(np.maximum(12 * scene - b, 1e-9)) + c
  return np.where(scene <= 1 / 12, np.sqrt(3 * scene), log_part)


def test_hdr_videos_are_shown_as_players_show_them_on_an_sdr_screen():
  """An iPhone's HLG video, or an HDR10 one, holds light in nits and colours in BT.2020's wider
  gamut; read as SDR BT.709 it looks grey and washed out. Shown as players do: HDR's diffuse
  white (203 nits) is SDR white, and a colour keeps its hue and saturation."""
  hdr = {'HLG': (_hlg_signal, 18), 'PQ': (_pq_signal, 16)}
  to_bt2020 = np.linalg.inv(np.array([[1.6605, -0.5876, -0.0728], [-0.1246, 1.1329, -0.0083],
                                      [-0.0182, -0.1006, 1.1187]]))
  # An SDR BT.709 colour, and the light a BT.1886 screen shows for it.
  sdr = np.array([0.75, 0.35, 0.2])
  nits = 203 * to_bt2020 @ sdr ** 2.4
  for name, (encode, trc) in hdr.items():
    tags = dict(colorspace=9, color_trc=trc, color_primaries=9)
    shown, _ = media.decode_video(_solid_mp4(encode(nits), _BT2020, **tags), 1, 4, fps=2.0)
    np.testing.assert_allclose(shown[0], np.broadcast_to(sdr, (4, 4, 3)), atol=3 / 255,
                               err_msg=name)
  # HDR highlights above SDR white are rolled off below it, brighter staying brighter, the hue
  # kept; SDR white itself (203 nits) is a little below white.
  greys = [media.decode_video(_solid_mp4(_pq_signal([n] * 3), _BT2020, colorspace=9, color_trc=16,
                                         color_primaries=9), 1, 4, fps=2.0)[0][0, 0, 0]
           for n in (203, 600, 1000)]
  assert 0.85 < greys[0][0] < greys[1][0] < greys[2][0] < 1
  assert np.ptp(greys, axis=1).max() < 2 / 255
  # Read as SDR BT.709, as before, the colour comes out far off.
  as_sdr, _ = media.decode_video(_solid_mp4(_hlg_signal(nits), _BT2020, colorspace=9), 1, 4,
                                 fps=2.0)
  assert np.abs(as_sdr[0, 0, 0] - sdr).max() > 0.1


def test_mirrored_videos_are_shown_as_their_display_matrix_says():
  """A display matrix [a b; c d] takes a stored pixel (x, y), y down, to (a x + c y, b x + d y):
  mirrorings too, which the rotation angle alone reads as half turns."""
  import av
  frame = np.zeros((16, 24, 3), np.uint8)
  frame[:8, :12] = [255, 0, 0]  # red top left, green top right: the 8 turnings differ
  frame[:8, 12:] = [0, 255, 0]
  unit = 1 << 16  # 16.16 fixed point

  def mp4(a, b, c, d):
    buf = io.BytesIO()
    with av.open(buf, 'w', format='mp4') as container:
      stream = container.add_stream('libx264', rate=2)
      stream.height, stream.width, stream.pix_fmt = 16, 24, 'yuv420p'
      stream.set_display_matrix([a * unit, b * unit, 0, c * unit, d * unit, 0, 0, 0, 1 << 30])
      for _ in range(2):
        container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format='rgb24')))
      container.mux(stream.encode())
    return buf.getvalue()

  corners = {'top left': (0, 0), 'top right': (0, -1), 'bottom left': (-1, 0),
             'bottom right': (-1, -1)}
  for matrix, red, green in [
      ((1, 0, 0, 1), 'top left', 'top right'),  # as stored
      ((-1, 0, 0, 1), 'top right', 'top left'),  # mirrored left to right
      ((1, 0, 0, -1), 'bottom left', 'bottom right'),  # mirrored top to bottom
      ((0, 1, 1, 0), 'top left', 'bottom left'),  # mirrored about the main diagonal
      ((0, -1, -1, 0), 'bottom right', 'top right'),  # about the other diagonal
      ((0, 1, -1, 0), 'top right', 'bottom right'),  # a quarter turn clockwise (a phone's)
      ((0, 0, 0, 0), 'top left', 'top right')]:  # a degenerate matrix: shown as stored
    shown, count = media.decode_video(mp4(*matrix), 2, 8, fps=2.0)
    assert count == 2
    for colour, corner in ((0, red), (1, green)):
      pixel = shown[0][corners[corner]]
      assert pixel[colour] > 0.9 and pixel[1 - colour] < 0.1, (matrix, corner, pixel)


def test_a_web_video_cut_short_gives_the_frames_before_the_cut(tmp_path):
  """A shop's video is written for streaming, its index first (faststart): cut short in the
  download, its first seconds still play. A video with its index last loses it, and every frame."""
  import av
  rng = np.random.default_rng(0)
  path = str(tmp_path / 'web.mp4')
  with av.open(path, 'w', format='mp4', options={'movflags': 'faststart'}) as container:
    stream = container.add_stream('libx264', rate=4)  # 10 s
    stream.height, stream.width, stream.pix_fmt = 32, 32, 'yuv420p'
    for _ in range(40):
      frame = rng.integers(0, 256, (32, 32, 3), np.uint8)
      container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, 'rgb24')))
    container.mux(stream.encode())
  with open(path, 'rb') as f:
    data = f.read()
  whole, taken = media.decode_video(data, 8, 16, 1.0)
  assert taken == 8
  cut, taken = media.decode_video(data[:len(data) // 2], 8, 16, 1.0)  # about 5 s left
  assert 3 <= taken <= 6
  np.testing.assert_array_equal(cut[:taken], whole[:taken])
  assert not cut[taken:].any()
  with pytest.raises(media.MediaError, match='cannot decode video'):
    media.decode_video(data[:len(data) // 100], 8, 16, 1.0)  # not one frame's data left


def test_files_that_are_not_media_say_what_they_are():
  """A scraper saves the error page it was served under the media's name; a designer exports an
  SVG; an iPhone takes HEIC. Each decoder says what the file is and what to do (an SVG given as a
  video crashed FFmpeg's reader: it opens SVG, and has no decoder for it)."""
  from PIL import Image
  files = {
      'HTML page': b'\n<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head></html>',
      'SVG drawing': b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg"/>',
      'HEIC/HEIF photo': b'\0\0\0\x18ftypheic\0\0\0\0mif1heic' + bytes(64),
      "text, not media: it begins '{\"error\": \"AccessDenied\"": b'{"error": "AccessDenied"}',
  }
  decoders = {'image': lambda d: media.decode_image(d, 8),
              'video': lambda d: media.decode_video(d, 2, 8, 1.0),
              'audio': lambda d: media.decode_audio(d, 16000, 1.0)}
  for what, data in files.items():
    for name, decode in decoders.items():
      with pytest.raises(media.MediaError, match=f'cannot decode {name}: it is ') as e:
        decode(data)
      assert what in str(e.value), (name, str(e.value))
  # Media keep their decoder's own reason: a PNG is not taken for anything else.
  assert media._not_media(_encoded(Image.new('RGB', (8, 8)), 'PNG')) is None


def test_video_frames_are_taken_from_the_streams_start_not_from_time_zero():
  """A clip cut from a longer stream keeps its clock: its first frame is shown at 10 s (MP4) or
  at 1 s (an MPEG-TS muxer's default). Frames one second apart from the first are taken, not
  the first ones in a row (each already after 0, 1, 2 ... s)."""
  import av
  rate = 2

  def clip(container_format, start_s):
    buf = io.BytesIO()
    with av.open(buf, 'w', format=container_format) as container:
      stream = container.add_stream('libx264', rate=rate)
      stream.height, stream.width, stream.pix_fmt = 16, 16, 'yuv420p'
      for i in range(16):  # frame i is grey 10 * i
        frame = av.VideoFrame.from_ndarray(np.full((16, 16, 3), 10 * i, np.uint8), 'rgb24')
        frame.pts, frame.time_base = start_s * rate + i, fractions.Fraction(1, rate)
        container.mux(stream.encode(frame))
      container.mux(stream.encode())
    return buf.getvalue()

  for container_format, start_s in [('mp4', 0), ('mp4', 10), ('mpegts', 0)]:
    data = clip(container_format, start_s)
    with av.open(io.BytesIO(data)) as container:
      first = next(container.decode(video=0)).time
    assert first >= start_s
    frames, count = media.decode_video(data, 4, 8, fps=1.0)
    assert count == 4
    greys = 255 * frames.mean(axis=(1, 2, 3))
    np.testing.assert_allclose(greys, [0, 20, 40, 60], atol=3, err_msg=(container_format, first))


def _small_video(codec, container_format, options) -> bytes:
  """4 s of 30 fps noise that changes every frame, 32 x 24."""
  import av
  rng = np.random.default_rng(0)
  buf = io.BytesIO()
  with av.open(buf, 'w', format=container_format) as container:
    stream = container.add_stream(codec, rate=30)
    stream.height, stream.width, stream.pix_fmt = 24, 32, 'yuv420p'
    stream.options = options
    for t in range(120):
      frame = (rng.integers(0, 80, (24, 32, 3)) + t).astype(np.uint8)
      container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format='rgb24')))
    container.mux(stream.encode())
  return buf.getvalue()


@pytest.mark.parametrize('codec,container_format,options', [
    ('libx264', 'mp4', {'g': '15', 'bf': '3'}),  # closed GOPs with B-frames
    ('libx264', 'mp4', {'x264-params': 'open-gop=1:keyint=20:bframes=3'}),
    ('libx265', 'mp4', {'x265-params': 'keyint=20:log-level=error'}),
    ('libvpx-vp9', 'webm', {'g': '15'}),
    ('mpeg4', 'mp4', {'g': '15', 'bf': '2'}),
])
def test_video_frames_are_those_of_decoding_every_frame(codec, container_format, options):
  """Restarting at keyframes and leaving unwanted non-reference frames undecoded take the very
  frames that decoding every frame in turn takes, bit for bit, at any rate and count (past the
  end of the video too)."""
  import av
  data = _small_video(codec, container_format, options)
  for num_frames, fps in [(4, 1.0), (6, 1.0), (2, 0.4), (7, 3.3), (30, 30.0), (130, 30.0)]:
    with av.open(io.BytesIO(data)) as container:
      every, wanted = [], 0.0
      for frame in container.decode(video=0):
        if frame.time + 1e-6 >= wanted:
          every.append((frame.time, frame.to_ndarray(format='rgb24')))
          wanted += 1 / fps
          if len(every) == num_frames:
            break
    with av.open(io.BytesIO(data)) as container:
      taken = [(f.time, f.to_ndarray(format='rgb24'))
               for f in media._wanted_frames(container, num_frames, fps)]
    assert [t for t, _ in taken] == [t for t, _ in every], (num_frames, fps)
    for (time, a), (_, b) in zip(taken, every):
      np.testing.assert_array_equal(a, b, err_msg=f'frame at {time} s')


def _sound_file(wave, rate, fmt='WAV', subtype='PCM_16') -> bytes:

  import soundfile
  buf = io.BytesIO()
  soundfile.write(buf, wave, rate, format=fmt, subtype=subtype)
  return buf.getvalue()


def test_audio_decodes_only_its_window_and_the_same_samples():
  rng = np.random.default_rng(0)
  for rate in (8000, 22050, 44100):
    wave = (0.3 * rng.standard_normal((3 * rate, 2))).astype(np.float32)
    for data in (_sound_file(wave, rate), _sound_file(wave, rate, 'FLAC'),
                 synthetic.encode_mp4(np.full((2, 16, 16, 3), 128, np.uint8), 2,
                                      audio=wave[:, 0], sample_rate=rate)):
      whole, samples = media.decode_audio(data, 16000)
      assert samples == len(whole) >= 48000  # (AAC adds a frame or two of padding)
      window, samples = media.decode_audio(data, 16000, 1.0)
      assert samples == 16000
      np.testing.assert_array_equal(window, whole[:16000])  # resampled as if read whole
  # Samples past the window are not read: NaN there fails only the build's check, which reads
  # the whole clip, and a NaN inside the window fails the decode.
  wave = np.sin(np.arange(16000, dtype=np.float32))
  wave[8000] = np.nan
  data = _sound_file(wave, 16000, subtype='FLOAT')
  assert np.isfinite(media.decode_audio(data, 16000, 0.2)[0]).all()
  for decode in (lambda: media.decode_audio(data, 16000, 0.5),
                 lambda: modalities.get('audio').check_bytes(data)):
    with pytest.raises(media.MediaError, match='NaN or Inf'):
      decode()


def test_a_sound_file_that_breaks_off_gives_what_it_holds():
  """A truncated WAV or MP3 read as far as it goes; a truncated FLAC or OGG was refused whole."""
  rng = np.random.default_rng(0)
  t = np.arange(20 * 16000) / 16000
  wave = (0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(len(t)))
  for fmt, subtype in (('FLAC', 'PCM_16'), ('OGG', 'VORBIS'), ('WAV', 'PCM_16')):
    data = _sound_file(wave.astype(np.float32), 16000, fmt, subtype)
    whole, _ = media.decode_audio(data, 16000, 12.0)
    cut, samples = media.decode_audio(data[:len(data) // 2], 16000, 12.0)  # 10 s of 20 left
    assert 7 * 16000 < samples <= 10 * 16000, fmt
    np.testing.assert_array_equal(cut[:samples], whole[:samples])
    assert not cut[samples:].any()  # padding, as for a short clip
    if fmt != 'WAV':  # (a WAV's every sample stands alone)
      with pytest.raises(media.MediaError, match='cannot decode audio'):
        media.decode_audio(data[:len(data) // 200], 16000, 12.0)  # not a block of sound left


def test_a_silent_sound_track_is_no_audio():
  """A muted video's sound track decodes to zeros: every such product would bring the same
  all-zero spectrogram. Quiet sound is still sound."""
  check = modalities.get('audio').check_bytes
  tone = np.sin(2 * np.pi * 440 * np.arange(16000) / 16000).astype(np.float32)
  check(_sound_file(10 ** (-60 / 20) * tone, 16000))  # a whisper, -60 dBFS: kept
  with pytest.raises(media.SilentAudio, match='silent .*exactly 0'):
    check(_silent_wav())
  with pytest.raises(media.SilentAudio, match=r'silent .*-9\d dBFS'):  # 16-bit dither
    check(_sound_file(np.float32(2 ** -15) * np.sign(tone), 16000))


def test_pcm_sound_tracks_of_every_sample_format_read_in_minus_one_to_one():
  """Integer PCM in MKV or MOV comes through FFmpeg as integers: unsigned 8-bit (silence at 128)
  and signed 16-, 32-bit are scaled to the waveform they encode, like float PCM."""
  import av
  wave = 0.5 * np.sin(2 * np.pi * 440 * np.arange(8000) / 16000)
  formats = {'pcm_u8': ('u8', np.uint8, lambda w: np.round(w * 128 + 128)),
             'pcm_s16le': ('s16', np.int16, lambda w: np.round(w * 2 ** 15)),
             'pcm_s32le': ('s32', np.int32, lambda w: np.round(w * 2 ** 31)),
             'pcm_f32le': ('flt', np.float32, lambda w: w)}
  for codec, (sample_format, dtype, encode) in formats.items():
    for container_format in ('matroska', 'mov'):
      buf = io.BytesIO()
      with av.open(buf, 'w', format=container_format) as container:
        stream = container.add_stream(codec, rate=16000, layout='mono')
        frame = av.AudioFrame.from_ndarray(encode(wave).astype(dtype)[None], format=sample_format,
                                           layout='mono')
        frame.sample_rate = 16000
        container.mux(stream.encode(frame))
        container.mux(stream.encode())
      decoded, samples = media.decode_audio(buf.getvalue(), 16000)
      assert samples == 8000, (codec, container_format)
      np.testing.assert_allclose(decoded, wave, atol=1 / 128, err_msg=f'{codec} {container_format}')


def test_features_files_npy_or_single_array_npz_of_real_numbers():

  def saved(save, *args, **kwargs):
    buf = io.BytesIO()
    save(buf, *args, **kwargs)
    return buf.getvalue()

  x = np.arange(12, dtype=np.float16).reshape(3, 4)
  for data in (saved(np.save, x), saved(np.savez, x), saved(np.savez_compressed, feat=x)):
    np.testing.assert_array_equal(media.decode_features(data), x.astype(np.float32))
  two_arrays = saved(np.savez, bbox=np.ones(3), feat=x)
  for data, reason in ((two_arrays, r'an .npz of 2 arrays \(bbox, feat\)'),
                       (saved(np.save, x.astype(np.complex64)), 'real numbers, not complex64'),
                       (b'{"features": [1, 2]}', r'not a .npy \(or .npz\) file')):
    with pytest.raises(media.MediaError, match=reason):
      media.decode_features(data)


def test_log_mel_peaks_at_the_tone():
  rate = 16000
  t = np.arange(rate) / rate
  low, high = (media.log_mel(np.sin(2 * np.pi * f * t).astype(np.float32), rate, 512, 256, 32)
               for f in (300.0, 3000.0))
  assert low.shape == (1 + (rate - 512) // 256, 32)
  assert low.mean(0).argmax() < high.mean(0).argmax()


def test_dataset_splits_and_tokenizer(data_dir):
  splits = {s: pipeline.open_split(data_dir, s) for s in ('train', 'validation', 'test')}
  assert sum(map(len, splits.values())) == 96 and all(map(len, splits.values()))
  ids = [{source[i]['item_id'] for i in range(len(source))} for source in splits.values()]
  assert sum(map(len, ids)) == len(set.union(*ids))  # no product in two splits
  tok = tokenizer.load_tokenizer(build.tokenizer_path(data_dir))
  ex = splits['train'][0]
  assert tok.decode(ex['caption_tokens'].tolist())  # round-trips to text


def test_text_spelling_a_special_token_is_text(tmp_path):
  sentences = [f'wallet {i} new sale [{i % 7}] leather' for i in range(200)]
  tok = tokenizer.train_tokenizer(sentences, str(tmp_path / 'tok.model'), vocab_size=400)
  title = 'wallet [MASK] sale [SEP] 包邮 [CLS] [PAD]'
  ids = tok.encode(title)
  assert not set(ids) & set(modalities.base.SPECIAL_IDS)
  assert tok.decode(ids) == title


def test_batches_have_the_documented_shapes(config):
  batch = next(iter(pipeline.train_dataset(config)))
  spec = modalities.dummy_batch(config, config.batch_size)
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
  config.batch_size = 4
  steps = n // 4  # one epoch
  whole = iter(pipeline.train_dataset(config))
  shares = [iter(pipeline.train_dataset(config, process_index=p, process_count=2))
            for p in range(2)]
  seen = [[], []]
  for _ in range(steps):
    global_batch = next(whole)
    local = [next(s) for s in shares]
    for p in range(2):
      seen[p] += _fingerprints(local[p])
    # Process p holds rows [2p, 2p + 2) of the single-process batch: masks included.
    for k in global_batch:
      np.testing.assert_array_equal(np.concatenate([local[0][k], local[1][k]]), global_batch[k])
  assert not set(seen[0]) & set(seen[1])
  assert len(set(seen[0]) | set(seen[1])) == 4 * steps  # every product of the epoch, once


@pytest.mark.parametrize('workers', [0, 1])
def test_resume_mid_epoch_continues_identically(config, workers):
  config.data.num_workers = workers
  it = iter(pipeline.train_dataset(config))
  for _ in range(3):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(3)]
  resumed = iter(pipeline.train_dataset(config))
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_media_that_fails_in_training_is_absent_not_fatal(config, caplog):
  source = pipeline.open_split(config.data.dir, 'train')
  preprocess = pipeline.Preprocess(pipeline._plain(config))
  image = MODALITIES.index('image')
  ex = next(dict(source[i]) for i in range(len(source)) if source[i]['present'][image])
  ex['image'] = b'not a jpeg'
  out = preprocess.map(ex)
  assert not out['present'][image] and not out['image_valid'].any()
  assert out['present'][MODALITIES.index('text')] == ex['present'][MODALITIES.index('text')]
  assert 'cannot decode image' in caplog.text and 'image treated as absent' in caplog.text


def test_decoded_cache_changes_nothing(config, data_dir):
  n = len(pipeline.open_split(data_dir, 'train'))
  steps = 2 * n // config.batch_size + 2  # into the third epoch
  config.data.cache_mb = 0
  plain = iter(pipeline.train_dataset(config))
  config.data.cache_mb = 64
  cached = iter(pipeline.train_dataset(config))
  for _ in range(steps):
    want, got = next(plain), next(cached)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_masks_change_with_the_epoch(config, data_dir):
  n = len(pipeline.open_split(data_dir, 'train'))
  config.batch_size = 1
  it = iter(pipeline.train_dataset(config))
  epochs = [{_fingerprints(b)[0]: b for b in (next(it) for _ in range(n))} for _ in range(2)]
  assert set(epochs[0]) == set(epochs[1])  # both epochs hold every product once
  same = [np.array_equal(epochs[0][k][f'{m}_masked'], epochs[1][k][f'{m}_masked'])
          for k in epochs[0] for m in MODALITIES]
  assert not all(same)


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
  mask = pipeline.Mask(pipeline._plain(config), np.arange(5, 400), 0, len(source))
  rng = np.random.default_rng(0)
  hits = 0
  for i in range(20):
    ex = pre.map(source[i])
    entities = ex['table_entities'].copy()
    out = mask.draw(ex, rng)
    for e in np.unique(entities[out['table_masked']]):
      assert e > 0  # never a [SEP]
      assert out['table_masked'][entities == e].all()  # the whole key or value
      hits += 1
  assert hits > 0


def test_max_masked_limits_a_row_and_leaves_rows_within_it_alone(config):
  """config.text.max_masked: a product with more masked tokens keeps a random max_masked of
  them (and only those are corrupted); one within the limit gets the very mask it had."""
  source = pipeline.open_split(config.data.dir, 'train')
  pre = pipeline.Preprocess(pipeline._plain(config))
  config.text.mask_rate = 0.5
  free = pipeline.Mask(pipeline._plain(config), np.arange(5, 400), 0, len(source))
  config.text.max_masked = 3
  limited = pipeline.Mask(pipeline._plain(config), np.arange(5, 400), 0, len(source))
  cut = kept = 0
  for i in range(30):
    ex = pre.map(source[i])
    a = free.draw(dict(ex), np.random.default_rng(i))['text_masked']
    out = limited.draw(dict(ex), np.random.default_rng(i))
    b = out['text_masked']
    assert b.sum() <= 3 and not (b & ~a).any()  # a subset of the mask it would have had
    if a.sum() > 3:
      assert b.sum() == 3
      cut += 1
    else:
      np.testing.assert_array_equal(a, b)
      kept += 1
    assert not ((out['text_input'] != out['text_target']) & ~b).any()
  assert cut and kept
