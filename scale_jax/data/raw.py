"""Reading the raw layout (docs/data.md): a JSONL manifest, one product per line, media paths
relative to the manifest. Ids and labels are kept as text (an integer as its digits): the build
maps them to dense integers.

Nothing in a catalogue of millions is clean. Every problem is reported to a `Problems` tally by
kind: a product keeps its other modalities with the broken one marked absent, a broken line is
skipped, and the build ends with a summary. With `strict=True` the first problem raises
RawDataError naming the file (and line) and the reason.
"""
import codecs
import collections
import gzip
import html
import html.entities
import json
import math
import os
import re
import unicodedata
import urllib.parse
import zlib

from scale_jax import modalities

# Manifest field of each modality, in MODALITIES order.
FIELDS = {m: modalities.get(m).field for m in modalities.MODALITIES}
# The modalities stored as media files (their manifest field is their name).
MEDIA = tuple(m for m in modalities.MODALITIES if not modalities.get(m).discrete)
# Pre-extracted feature arrays (.npy, [tokens, dim] or [dim]) a product may bring per media
# modality, read instead of the media when the config says `source='features'`.
FEATURE_FIELDS = {m: f'{m}_features' for m in MEDIA}

# The fields a manifest line is read for. Any other is reported (build.unread_fields): a caption
# given as "title" would otherwise train as products without a caption, and no error says so.
READ_FIELDS = frozenset({'item_id', 'label', 'instance_id', FIELDS['text'], FIELDS['table'],
                         *MEDIA, *FEATURE_FIELDS.values()})
# What other exports call them, for the report to name the field meant.
FIELD_ALIASES = {
    'title': 'caption', 'name': 'caption', 'text': 'caption', 'description': 'caption',
    'product_name': 'caption', 'table': 'tabular', 'properties': 'tabular',
    'attributes': 'tabular', 'specs': 'tabular', 'category': 'label', 'class': 'label',
    'category_id': 'label', 'id': 'item_id', 'product_id': 'item_id', 'img': 'image',
    'image_path': 'image', 'picture': 'image', 'main_image': 'image', 'video_path': 'video',
    'audio_path': 'audio', 'sound': 'audio'}

# Every kind of bad input, in the order the summary lists them.
PROBLEM_KINDS = (
    'broken line',  # not JSON, not an object, no item_id / label, or an id that is neither
                    # text nor an integer: the line is skipped
    'duplicate item_id',  # a later line repeating an earlier id: skipped
    'undecodable text',  # caption or table not (valid UTF-8) text: that modality absent
    'malformed table',  # not `k#:#v#;#...`, [[k, v], ...] nor [{name, value}, ...]: table absent
    'missing file',  # a media or features path that does not exist: that modality absent
    *(f'corrupt {m}' for m in MEDIA),  # does not decode: modality absent
    'silent audio',  # a sound track without sound (a muted video's): audio absent
    'corrupt features',  # not a finite float array of the dataset's feature size
    'no usable modality',  # nothing left to learn from: the product is skipped
)


class RawDataError(ValueError):
  """Raw input that cannot be used; the message names the file and the reason."""


class Problems:
  """A tally of bad input by kind, with the individual problems kept for the build report."""

  def __init__(self, strict: bool = False):
    self.strict = strict
    self.counts = collections.Counter()
    self.items = []  # (kind, where, reason)

  def add(self, kind: str, where: str, reason: str) -> None:
    assert kind in PROBLEM_KINDS, kind
    if self.strict:
      raise RawDataError(f'{where}: {reason}')
    self.counts[kind] += 1
    self.items.append((kind, where, reason))

  def __bool__(self):
    return bool(self.counts)

  def summary(self) -> str:
    if not self.counts:
      return 'no bad input'
    return ', '.join(f'{self.counts[k]} {k}' for k in PROBLEM_KINDS if self.counts[k])

  def summary_and_first(self) -> str:
    """The summary and the first problem in full: what to fix when nothing was usable."""
    if not self.items:
      return self.summary()
    _, where, reason = self.items[0]
    return f'{self.summary()}; the first: {where}: {reason}'


# What a missing cell becomes in a column cast to text (pandas' `astype(str)`: NaN, None, pd.NA,
# NaT), and a null written as text.
_GAP_WORDS = frozenset({'nan', 'none', 'null', '<na>', 'nat'})
# A table value of "None" is a value ("batteries: None"); the other words are gaps there too.
_TABLE_GAP_WORDS = _GAP_WORDS - {'none'}


def _is_gap(value, words=_GAP_WORDS) -> bool:
  """A missing cell: null, NaN (Python's json writes a pandas gap as the literal NaN), or one of
  `words` as text (any case), as a column cast to text writes a gap."""
  if isinstance(value, str):
    return value.strip().lower() in words
  return value is None or (isinstance(value, float) and math.isnan(value))


_ENTITY = re.compile(r'&(?:#[0-9]+|#[xX][0-9a-fA-F]+|[A-Za-z][A-Za-z0-9]*);')
_MARKUP = re.compile(r'<\s*/?\s*(?:a|b|br|div|em|font|h[1-6]|hr|i|img|li|ol|p|span|strong|sub|'
                     r'sup|table|td|th|tr|u|ul)\b[^<>]*>', re.IGNORECASE)


# Characters nobody sees that the tokenizer would keep as byte pieces, cutting the word they sit
# in ("Kinder&shy;wagen" as "Kinder" <0xC2> <0xAD> "wagen"): controls other than whitespace, the
# soft hyphen, joiners (combining grapheme, zero-width, word), direction marks, embeddings and
# isolates, the zero-width no-break space (a BOM inside text), emoji tags. Word breaks (the
# zero-width space, the zero-width non-joiner) are left: the tokenizer reads them as spaces.
_INVISIBLE = re.compile('[\x00-\x08\x0e-\x1f\x7f-\x84\x86-\x9f\u00ad\u034f\u061c\u180e'
                        '\u200d-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u206f\ufeff'
                        '\U000e0001\U000e0020-\U000e007f]')


def _character(reference: re.Match) -> str:
  """What an HTML character reference stands for; a name HTML does not define, as written
  (html.unescape alone reads "&notice;" as "¬ice;")."""
  name = reference[0][1:]
  if name.startswith('#') or name in html.entities.html5:
    return html.unescape(reference[0])
  return reference[0]


def _byte_of_char() -> dict[str, int]:
  """Each character a byte becomes when UTF-8 is misread as Windows-1252 or as Latin-1."""
  table = {chr(b): b for b in range(256)}  # Latin-1
  for b in range(128, 256):
    try:
      table[bytes([b]).decode('cp1252')] = b
    except UnicodeDecodeError:  # five bytes Windows-1252 leaves undefined
      pass
  return table


_BYTE_OF_CHAR = _byte_of_char()


def _unmangled(text: str) -> str:
  """UTF-8 that was misread as Windows-1252 or Latin-1 ("cafÃ©", "itâ€™s", "ä¸­æ–‡", also misread
  twice) as it was written; any other text as it is. Only a string whose every character is such
  a byte, and whose bytes are valid UTF-8, is read back: text a person typed almost never is."""
  for _ in range(3):
    if text.isascii():
      return text
    try:
      text = bytes(_BYTE_OF_CHAR[c] for c in text).decode('utf-8')
    except (KeyError, UnicodeDecodeError):
      return text
  return text


def plain_text(text: str) -> str:
  """Caption or table text as a shop shows it: mojibake read back (_unmangled), HTML character
  references read (`&amp;`, `&#39;`, also escaped twice, as scraped and XML exports write them)
  and HTML formatting tags (`<br>`, `<b>`) as spaces, so "Tom &amp; Jerry" is tokenized as
  "Tom & Jerry". An `&` without its `;` stays as written ("AT&T", "R&D", "Salt&Pepper").
  Invisible characters (_INVISIBLE: a soft hyphen, a direction mark, a stray control) are
  left out, so the words they sit in are the words shown."""
  text = _unmangled(text)
  for _ in range(3):  # "&amp;amp;" -> "&amp;" -> "&"
    unescaped = _ENTITY.sub(_character, text)
    if unescaped == text:
      break
    text = unescaped
  return _INVISIBLE.sub('', _MARKUP.sub(' ', text)).strip()


def parse_table(table) -> list[tuple[str, str]]:
  """The table as the official string `k#:#v#;#k#:#v`, a list of [key, value] pairs (or of
  {"name": key, "value": value} objects, _entry_pair) or a {key: value} object (or None / '' /
  []) -> [(key, value), ...] as plain_text; a value may be a string, a number, a boolean or a
  list of them (joined by ", "); pairs whose value is null (or []), or with neither key nor
  value, are left out. Raises ValueError if malformed."""
  if _is_gap(table) or not table:
    return []
  if isinstance(table, dict):
    table = list(table.items())
  if isinstance(table, str):
    pairs = []
    for item in table.split('#;#'):
      if not item.strip():
        continue
      key, sep, value = item.partition('#:#')
      if not sep:
        raise ValueError(f'table entry {item!r} has no "#:#" between key and value')
      pairs.append((key, value))
  elif isinstance(table, list):
    pairs = [_entry_pair(item) for item in table]
  else:
    raise ValueError(f'table is a {type(table).__name__}, not a string or a list of pairs')
  out = []
  for key, value in pairs:
    # A property of several values ("color": ["red", "blue"]) reads as "red, blue".
    values = value if isinstance(value, list) else [value]
    texts = [_scalar_text(v) for v in values if not _is_gap(v, _TABLE_GAP_WORDS)]
    if not texts:  # a property the product does not have (a sparse table's gap)
      continue
    if not isinstance(key, str) or None in texts:
      raise ValueError(f'table entry ({key!r}, {value!r}) is not text')
    key, value = plain_text(key), plain_text(', '.join(texts))
    if key or value:  # `#:#` alone, or blanks: nothing to read
      out.append((key, value))
  return out


# The fields of a table entry written as an object: schema.org's PropertyValue, which scraped
# product pages carry in their JSON-LD ({"@type": "PropertyValue", "name": ..., "value": ...}),
# Google Merchant's product_detail, and the {"key": ..., "value": ...} of many APIs.
_ENTRY_KEY_FIELDS = ('name', 'key', 'attribute', 'attribute_name', 'property')
_ENTRY_VALUE_FIELDS = ('value', 'values', 'attribute_value')


def _entry_pair(item) -> tuple:
  """One entry of a table given as a list -> (key, value): a [key, value] pair, or an object
  with one of _ENTRY_KEY_FIELDS and one of _ENTRY_VALUE_FIELDS (its other fields, a "@type"
  or a section name, left out). Raises ValueError otherwise."""
  if isinstance(item, (list, tuple)) and len(item) == 2:
    return tuple(item)
  if isinstance(item, dict):
    keys = [item[f] for f in _ENTRY_KEY_FIELDS if f in item]
    values = [item[f] for f in _ENTRY_VALUE_FIELDS if f in item]
    if len(keys) == 1 and len(values) == 1:
      return keys[0], values[0]
    raise ValueError(f'table entry {item!r} is an object without one name field '
                     f'({", ".join(_ENTRY_KEY_FIELDS)}) and one value field '
                     f'({", ".join(_ENTRY_VALUE_FIELDS)})')
  raise ValueError(f'table entry {item!r} is not a [key, value] pair')


def _scalar_text(value) -> str | None:
  """A JSON string, number or boolean as text (None for a list or an object): `true` and
  `false` as JSON writes them, an integral float as its digits (pandas writes an integer column
  with gaps as floats: 500.0 is 500)."""
  if isinstance(value, bool):
    return 'true' if value else 'false'
  if isinstance(value, float) and value.is_integer():
    return str(int(value))
  return str(value) if isinstance(value, (str, int, float)) else None


def _is_text(s: str) -> bool:
  """False for strings holding bytes that were not valid UTF-8 (kept as lone surrogates)."""
  try:
    s.encode('utf-8')
    return True
  except UnicodeEncodeError:
    return False


def manifest_path(raw: str) -> str:
  """The manifest of a raw layout given as its directory (holding manifest.jsonl, or
  manifest.jsonl.gz) or as the manifest file itself."""
  if not os.path.isdir(raw):
    return raw
  plain = os.path.join(raw, 'manifest.jsonl')
  gzipped = plain + '.gz'
  return gzipped if not os.path.exists(plain) and os.path.exists(gzipped) else plain


def id_text(value) -> str | None:
  """An item id, instance id or label as text: a string as plain_text, in Unicode NFC, its
  whitespace collapsed; an integer as its digits (also an integral float, as pandas writes an
  integer column with gaps); None when absent, blank or a gap (_is_gap: NaN, "nan", "None").
  Raises ValueError for any other JSON value."""
  if _is_gap(value):
    return None
  if isinstance(value, float) and value.is_integer():
    value = int(value)
  if isinstance(value, bool) or not isinstance(value, (str, int)):
    raise ValueError(f'{value!r} is neither text nor an integer')
  # "shoes " and "shoes", "café" typed on a Mac (NFD) and on Windows (NFC), "Toys &amp; Games"
  # from a scraped page and "Toys & Games" look the same to whoever labelled them and must be
  # one category, one instance, one id.
  text = ' '.join(unicodedata.normalize('NFC', plain_text(str(value))).split())
  return text or None


_PATH_SEPARATOR = ' > '


def label_text(value) -> str | None:
  """A label as text: as id_text reads it, or a category path (a list, `["Clothing", "Shoes"]`,
  as shop exports write a product's place in the category tree) as its names joined by " > ",
  blank names left out: the whole path, since the same leaf can sit under two branches
  ("Shoes" of Clothing and of Sports). Raises ValueError for any other JSON value."""
  if not isinstance(value, list):
    return id_text(value)
  names = [id_text(name) for name in value]
  return _PATH_SEPARATOR.join(name for name in names if name) or None


_PART_SEPARATOR = ' / '


def caption_text(caption) -> str:
  """A caption as text ('' when absent): a string; a title that is only a number, as a
  spreadsheet writes it, as its digits; a title in several languages (an object, `{"en": ...,
  "zh": ...}`, as multi-locale shop exports write it) or in several parts (a list) as its texts
  in the order written, joined by " / ", gaps, blanks and repeats left out. Raises ValueError
  for anything else (a boolean, a nested object) or for text that is not valid UTF-8."""
  several = isinstance(caption, (dict, list))
  parts = list(caption.values()) if isinstance(caption, dict) else caption if several else [caption]
  texts = []
  for part in parts:
    if _is_gap(part):
      continue
    if isinstance(part, bool) or not isinstance(part, (str, int, float)):
      raise ValueError(f'{"holds" if several else "is"} a JSON {type(part).__name__}, not text')
    text = _scalar_text(part)
    if not _is_text(text):
      raise ValueError('is not valid UTF-8 text')
    text = plain_text(text)
    if text and text not in texts:
      texts.append(text)
  return _PART_SEPARATOR.join(texts)


def _key(name: str) -> str:
  """A file name as Windows and macOS compare names: letter case ignored, and Unicode forms
  (macOS stores "é" as e + accent, NFD; a manifest typed elsewhere has NFC)."""
  return unicodedata.normalize('NFC', name).casefold()


def _as_named_here(path: str, folders: dict) -> str | None:
  """The file `path` names on a file system that compares names by _key, where exactly one
  file matches each missing part; None otherwise. `folders` caches {folder: {key: [names]}}
  (a folder is listed once, at its first miss)."""
  head, missing = path, []
  while not os.path.exists(head):
    head, name = os.path.split(head)
    if not name:
      return None
    missing.append(name)
  for name in reversed(missing):
    if head not in folders:
      folders[head] = collections.defaultdict(list)
      try:
        for entry in os.listdir(head):
          folders[head][_key(entry)].append(entry)
      except OSError:
        pass
    matches = folders[head].get(_key(name), [])
    if len(matches) != 1:
      return None
    head = os.path.join(head, matches[0])
  return head if os.path.isfile(head) else None


def _local_path(rel: str, root: str, folders: dict) -> str:
  """The file a manifest's media path names: relative to the manifest (or absolute); a
  `file://` URI (some exports write one) as its path; `\\` as the folder separator where the
  path as written is not a file (a manifest written on Windows: images\\a.jpg); names compared
  as Windows and macOS compare them (_key: `IMG_01.JPG` for img_01.jpg) where nothing has the
  name as written. The path as written (made absolute) where nothing matches."""
  if rel.startswith('file://'):
    rel = urllib.parse.unquote(urllib.parse.urlparse(rel).path)
  full = os.path.normpath(os.path.join(root, rel))  # ./a.jpg and a.jpg: one file
  if os.path.isfile(full):
    return full
  if '\\' in rel:
    full = os.path.normpath(os.path.join(root, rel.replace('\\', '/')))
    if os.path.isfile(full):
      return full
  return _as_named_here(full, folders) or full


def _read_product(line: bytes, where: str, root: str, problems: Problems,
                  folders: dict) -> dict | None:
  """One manifest line -> a product dict (absolute paths, _local_path; broken modalities set to
  None), or None for a line that has to be skipped."""
  # surrogateescape keeps invalid UTF-8 bytes as lone surrogates, so the rest of the line still
  # parses and only the field holding them is lost.
  text = line.decode('utf-8', errors='surrogateescape')
  try:
    record = json.loads(text)
  except json.JSONDecodeError as e:
    problems.add('broken line', where, f'not a JSON object: {e}')
    return None
  if not isinstance(record, dict):
    problems.add('broken line', where, f'a JSON {type(record).__name__}, not an object')
    return None
  ids = {}
  for field in ('item_id', 'label', 'instance_id'):
    try:
      ids[field] = (label_text if field == 'label' else id_text)(record.get(field))
    except ValueError as e:
      problems.add('broken line', where, f'{field} {e}')
      return None
    if ids[field] is None and field != 'instance_id':
      written = record.get(field)
      gap = f' (it reads {written!r}: a missing cell)' if _is_gap(written) and written else ''
      alias = next((k for k in record if FIELD_ALIASES.get(k.lower()) == field), None)
      if alias:
        gap += f'; the line has "{alias}": if that is the {field}, name it "{field}"'
      problems.add('broken line', where, f'required field "{field}" is missing{gap}')
      return None
    if ids[field] is not None and not _is_text(ids[field]):
      problems.add('broken line', where, f'{field} is not valid UTF-8')
      return None

  # instance_id None: the product is its own instance.
  product = dict(ids, where=where, audio_in_video=False,
                 unread=sorted(k for k in record if k not in READ_FIELDS))
  try:
    product['caption'] = caption_text(record.get('caption'))  # blanks alone are no caption
  except ValueError as e:
    problems.add('undecodable text', where, f'caption {e}')
    product['caption'] = ''

  table = record.get('tabular')
  try:
    product['tabular'] = parse_table(table)
  except ValueError as e:
    problems.add('malformed table', where, f'malformed "tabular": {e}')
    product['tabular'] = []
  if not all(_is_text(k) and _is_text(v) for k, v in product['tabular']):
    problems.add('undecodable text', where, 'table is not valid UTF-8 text')
    product['tabular'] = []

  for field in MEDIA + tuple(FEATURE_FIELDS.values()):
    rel, product[field] = record.get(field), None
    if isinstance(rel, list):  # a gallery, as scraped pages list them: the first is the main one
      rel = next((r for r in rel if not _is_gap(r) and r), None)
    if _is_gap(rel) or not rel:
      continue
    if isinstance(rel, (dict, list)):
      problems.add('missing file', where, f'{field} is a JSON {type(rel).__name__}, not a path')
      continue
    rel = str(rel)
    full = _local_path(rel, root, folders)
    if not os.path.isfile(full):
      url = re.match(r'([A-Za-z]+)://', rel)
      inline = rel[:5].lower() == 'data:'
      reason = (f'a {url[1]}:// address: media are local files, relative to the manifest '
                f'(download them first)' if url else
                'a data: URI, the file inline (scraped pages put a lazy-loading placeholder '
                'there): media are local files, write it to one' if inline else
                'a directory, not a file' if os.path.isdir(full) else 'does not exist')
      named = rel if url else f'{rel[:40]}...' if inline else full
      problems.add('missing file', named, f'{field} file named on {where}: {reason}')
      continue
    product[field] = full
  if product['audio'] and product['audio'] == product['video']:
    product['audio_in_video'] = True  # the video's sound track: not stored twice
  return product


_TO_JSONL = '.to_json("manifest.jsonl", orient="records", lines=True, force_ascii=False)'


def _other_format(path: str, first_line: bytes) -> str | None:
  """What a manifest that is not JSON is, from its first line, with the pandas line that turns
  it into one; None for anything else (a JSONL file whose first line is broken is read on)."""
  if first_line.startswith(b'PAR1'):
    return f'a Parquet file: pd.read_parquet({path!r}){_TO_JSONL}'
  if first_line.startswith(b'\xd0\xcf\x11\xe0'):  # (an old .xls)
    return f'an Excel workbook: pd.read_excel({path!r}){_TO_JSONL}'
  if first_line.startswith(b'PK\x03\x04'):
    return f'a zip archive: unzip it, or for an Excel workbook: pd.read_excel({path!r}){_TO_JSONL}'
  header = first_line.decode('utf-8', errors='replace').strip()
  for name, sep in (('CSV', ','), ('TSV', '\t')):
    if '{' not in header and 'item_id' in [f.strip(' "') for f in header.split(sep)]:
      read = f'pd.read_csv({path!r}' + (', sep="\\t")' if sep == '\t' else ')')
      return f'a {name} file (its header names item_id): {read}{_TO_JSONL}'
  return None


def _opened(path: str, head: bytes):
  """The manifest opened to read UTF-8 bytes: gunzipped, or from UTF-16 (what Windows
  PowerShell's `>` and Out-File write, a byte-order mark first) recoded line by line."""
  if head == b'\x1f\x8b':
    return gzip.open(path, 'rb')
  if head in (b'\xff\xfe', b'\xfe\xff'):
    return codecs.EncodedFile(open(path, 'rb'), data_encoding='utf-8', file_encoding='utf-16',
                              errors='replace')
  return open(path, 'rb')


def _manifest_lines(path: str):
  """Yields (where, the JSON text of one product as bytes) from a JSONL manifest, gzipped or
  not, read line by line; or from a file holding one JSON array of products (what a JSON export
  often writes), whose elements count as its lines."""
  with open(path, 'rb') as f:
    head = f.read(2)
  try:
    with _opened(path, head) as f:
      line_no, line = 1, f.readline().removeprefix(b'\xef\xbb\xbf')  # a Windows byte-order mark
      while line and not line.strip():
        line_no, line = line_no + 1, f.readline()
      if other := _other_format(path, line):
        raise RawDataError(f'{path}: a manifest is JSON lines (docs/data.md), this is {other}')
      if line.lstrip().startswith(b'['):
        text = (line + f.read()).decode('utf-8', errors='surrogateescape')
        try:
          records = json.loads(text)
        except json.JSONDecodeError as e:
          raise RawDataError(f'{path}: starts as a JSON array but does not parse ({e}); a '
                             f'manifest is one JSON object per line, or one array of '
                             f'them') from None
        for i, record in enumerate(records, 1):  # re-encoded: lone surrogates as \u escapes
          yield f'{path}: array element {i}', json.dumps(record).encode('ascii')
        return
      while line:
        if line.strip():
          yield f'{path}:{line_no}', line
        line_no, line = line_no + 1, f.readline()
  except (gzip.BadGzipFile, EOFError, zlib.error) as e:
    raise RawDataError(f'{path}: a gzip file that does not decompress ({e})') from None


def read_manifest(path: str, problems: Problems | None = None) -> list[dict]:
  """Parses the manifest; returns one dict per usable product, media paths made absolute and
  item_id, label and instance_id as text (instance_id None where the line has none).

  Problems go to `problems` (a strict tally if none is given, so the first one raises). Raises
  RawDataError for a missing manifest or one without a single usable product.
  """
  problems = Problems(strict=True) if problems is None else problems
  if not os.path.isfile(path):
    raise RawDataError(f'{path}: manifest not found (expected a JSONL file, see docs/data.md)')
  root = os.path.dirname(os.path.abspath(path))
  products, seen, folders = [], set(), {}
  for where, line in _manifest_lines(path):
    product = _read_product(line, where, root, problems, folders)
    if product is None:
      continue
    if product['item_id'] in seen:
      problems.add('duplicate item_id', where, f'item_id {product["item_id"]!r} appeared before')
      continue
    seen.add(product['item_id'])
    products.append(product)
  if not products:
    raise RawDataError(f'{path}: manifest has no usable products '
                       f'({problems.summary_and_first()})')
  return products


def has_modality(product: dict, modality: str) -> bool:
  field = FIELDS[modality]
  return bool(product[field] or product.get(FEATURE_FIELDS.get(modality)))
