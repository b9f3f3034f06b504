"""The sentencepiece tokenizer shared by captions and tables (one vocabulary, as in the paper)."""
import io

import numpy as np
import sentencepiece as spm
import tqdm
from etils import epath

# The ids train_tokenizer fixes; defined beside the token modalities that use them.
from scale_jax.modalities.base import CLS, MASK, PAD, SEP, SPECIAL_IDS, UNK  # pylint: disable=W0611


def train_tokenizer(sentences: list, model_path: str, vocab_size: int,
                    progress: bool = False,
                    max_sentences: int = 5_000_000) -> spm.SentencePieceProcessor:
  """Trains a unigram model on the sentences and writes it to model_path.

  vocab_size is an upper bound: a small corpus gets a smaller vocabulary. A corpus larger than
  max_sentences is sampled evenly (sentencepiece's own sampling is not seeded). The progress bar
  counts the sentences sentencepiece reads; its training afterwards reports nothing.
  """
  if len(sentences) > max_sentences:  # an even, deterministic sample (rebuilds must agree)
    sentences = sentences[::-(-len(sentences) // max_sentences)]
  model = io.BytesIO()
  sentences = tqdm.tqdm(sentences, desc='tokenizer: reading', unit='sentence',
                        disable=not progress)
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(sentences), model_writer=model, vocab_size=vocab_size,
      model_type='unigram', character_coverage=0.9995, hard_vocab_limit=False,
      byte_fallback=True,  # rare characters (Chinese has thousands) become bytes, not <unk>
      pad_id=PAD, pad_piece='[PAD]', unk_id=UNK, bos_id=-1, eos_id=-1,
      # Control symbols, not user-defined ones: those are also matched in the text, so a title
      # holding the letters "[MASK]" or "[SEP]" would bring the objective's own tokens.
      control_symbols=['[CLS]', '[SEP]', '[MASK]'], minloglevel=2)
  with open(model_path, 'wb') as f:
    f.write(model.getvalue())
  return load_tokenizer(model_path)


def load_tokenizer(model_path: str) -> spm.SentencePieceProcessor:
  """The tokenizer at model_path, local or gs:// (read as bytes: sentencepiece opens local files
  only)."""
  tok = spm.SentencePieceProcessor(model_proto=epath.Path(model_path).read_bytes())
  specials = [tok.id_to_piece(i) for i in (PAD, CLS, SEP, MASK)]
  if specials != ['[PAD]', '[CLS]', '[SEP]', '[MASK]']:
    raise ValueError(f'{model_path}: not a tokenizer written by scale_jax.data.build (special '
                     f'tokens {specials})')
  return tok


def replacement_ids(tok: spm.SentencePieceProcessor) -> np.ndarray:
  """The ids the tokenizer emits for text (word pieces and byte pieces; no special, control or
  unused ids): what MLM/MEM's random replacements are drawn from."""
  ids = [i for i in range(tok.vocab_size())
         if not (tok.is_control(i) or tok.is_unknown(i) or tok.is_unused(i) or i in SPECIAL_IDS)]
  return np.array(ids, np.int32)


def encode_table(tok: spm.SentencePieceProcessor, pairs) -> tuple[list[int], list[int]]:
  """Tokens `k1 v1 [SEP] k2 v2 [SEP] ...` and, per token, its entity: 2i+1 for the key of pair i,
  2i+2 for its value, 0 for [SEP]. MEM masks whole entities through these ids."""
  tokens, entities = [], []
  for i, (key, value) in enumerate(pairs):
    for entity, text in ((2 * i + 1, key), (2 * i + 2, value)):
      ids = tok.encode(text)
      tokens += ids
      entities += [entity] * len(ids)
    tokens.append(SEP)
    entities.append(0)
  return tokens, entities
