"""Reading the raw layout (docs/data.md): a JSONL manifest, one product per line, media paths
relative to the manifest."""
import json
import os

from scale_jax import MODALITIES

# Manifest field of each modality, in MODALITIES order.
FIELDS = dict(zip(MODALITIES, ('caption', 'tabular', 'image', 'video', 'audio')))
MEDIA = ('image', 'video', 'audio')


class RawDataError(ValueError):
  """Raw input that cannot be used; the message names the file and the reason."""


def parse_table(table) -> list[tuple[str, str]]:
  """The official table string `k#:#v#;#k#:#v` (or None/'') -> [(key, value), ...]."""
  if not table:
    return []
  pairs = []
  for item in table.split('#;#'):
    if not item.strip():
      continue
    key, sep, value = item.partition('#:#')
    if not sep:
      raise ValueError(f'table entry {item!r} has no "#:#" between key and value')
    pairs.append((key.strip(), value.strip()))
  return pairs


def read_manifest(path: str) -> list[dict]:
  """Parses and checks the manifest; returns one dict per product with absolute media paths.

  Raises RawDataError naming the file (and line) for a missing manifest, a broken line, a missing
  required field, or a media path that does not exist.
  """
  if not os.path.isfile(path):
    raise RawDataError(f'{path}: manifest not found (expected a JSONL file, see docs/data.md)')
  root = os.path.dirname(os.path.abspath(path))
  products = []
  with open(path, encoding='utf-8') as f:
    for line_no, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f'{path}:{line_no}'
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise RawDataError(f'{where}: not a JSON object: {e}') from e
      for field in ('item_id', 'label'):
        if record.get(field) is None:
          raise RawDataError(f'{where}: required field "{field}" is missing')
      try:
        record['tabular'] = parse_table(record.get('tabular'))
      except ValueError as e:
        raise RawDataError(f'{where}: malformed "tabular": {e}') from e
      for field in MEDIA:
        rel = record.get(field)
        if rel:
          full = os.path.join(root, rel)
          if not os.path.isfile(full):
            raise RawDataError(f'{full}: {field} file named on {where} does not exist')
          record[field] = full
        else:
          record[field] = None
      record['caption'] = record.get('caption') or ''
      record['instance_id'] = int(record.get('instance_id', -1))
      record['label'] = int(record['label'])
      if not any(record[FIELDS[m]] for m in MODALITIES):
        raise RawDataError(f'{where}: product {record["item_id"]} has no modality at all')
      products.append(record)
  if not products:
    raise RawDataError(f'{path}: manifest has no products')
  return products
