"""The property table: `[CLS] k1 v1 [SEP] k2 v2 [SEP] ...`, masked entity modelling (MEM)."""
import numpy as np

from scale_jax.modalities.base import CLS, TokenModality, pad_tokens


class Table(TokenModality):
  name, field, objective = 'table', 'tabular', 'mem'
  mask_keys = ('table_entities',)

  def preprocess(self, ex, present, c):
    """Each token keeps its entity (2i+1: the key of pair i, 2i+2: its value, 0: [CLS]/[SEP]),
    so that MEM can mask whole keys or values."""
    tokens = pad_tokens([CLS] + list(ex['table_tokens']), c['max_len'])
    return {'table_input': tokens, 'table_valid': (tokens != 0) & present,
            'table_entities': pad_tokens([0] + list(ex['table_entities']), c['max_len'])}

  def draw_mask(self, ex, rng, c):
    """config.table.mask_unit='entity' (the paper's MEM): mask_rate of the key/value pairs, and
    of each chosen pair all tokens of the key or (p = 0.5) all tokens of the value. 'token':
    mask_rate of the word pieces, as MLM does (the paper's sub-word ablation)."""
    if c['mask_unit'] == 'token':
      return super().draw_mask(ex, rng, c)
    entities = np.where(ex['table_valid'], ex['table_entities'], 0)
    pairs = np.unique((entities[entities > 0] + 1) // 2)
    chosen = pairs[rng.random(len(pairs)) < c['mask_rate']]
    value_side = rng.random(len(chosen)) < 0.5
    return np.isin(entities, 2 * chosen - 1 + value_side)

  def check(self, c):
    problems = super().check(c)
    if c['mask_unit'] not in ('entity', 'token'):
      problems.append(f"config.table.mask_unit={c['mask_unit']!r}: 'entity' (MEM) or 'token'")
    return problems


TABLE = Table()
