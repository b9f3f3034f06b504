"""What every modality is: the interface the pipeline, the model, the losses and model_info ask.

A modality is one of two kinds:
  - tokens (`TokenModality`): ids from the shared sentencepiece vocabulary, the first one ([CLS])
    the global token; masked positions are corrupted BERT-style and predicted by cross-entropy;
  - patches (`PatchModality`): continuous vectors (image patches, video frames, spectrogram
    patches, or pre-extracted features), a learned global token prepended by the model; masked
    positions are swapped for a learned mask vector and regressed.
Each modality's config section (`config.<name>`) is passed as `c`: a ConfigDict, or its plain-dict
form inside Grain workers, so only `c[field]` access is used here. Numpy only: this sits at the
bottom of the import graph and runs in Grain worker processes.
"""
import numpy as np

# Special token ids, fixed by scale_jax.data.tokenizer.train_tokenizer.
PAD, UNK, CLS, SEP, MASK = 0, 1, 2, 3, 4
SPECIAL_IDS = (PAD, UNK, CLS, SEP, MASK)


def pad_tokens(tokens, length: int) -> np.ndarray:
  out = np.full(length, PAD, np.int32)
  tokens = tokens[:length]
  out[:len(tokens)] = tokens
  return out


def patchify(x: np.ndarray, ph: int, pw: int) -> np.ndarray:
  """[H, W, C] -> [(H/ph) * (W/pw), ph * pw * C], row-major over patches."""
  h, w, c = x.shape
  x = x.reshape(h // ph, ph, w // pw, pw, c).transpose(0, 2, 1, 3, 4)
  return x.reshape((h // ph) * (w // pw), ph * pw * c)


def divides(c, name: str, part: str, whole: str) -> list:
  """A config problem if c[part] does not divide c[whole] (empty list if it does)."""
  if c[whole] < 1:
    return [f'config.{name}.{whole}={c[whole]} must be positive']
  if c[part] > 0 and c[whole] % c[part] == 0:
    return []
  fits = [d for d in range(1, c[whole] + 1) if c[whole] % d == 0 and d <= max(c[part], 1)]
  return [f'config.{name}.{part}={c[part]} does not divide config.{name}.{whole}={c[whole]}; '
          f'e.g. --config.{name}.{part}={fits[-1] if fits else 1}']


class Modality:
  """The facts and behaviour of one modality. Subclasses set the class attributes."""
  name: str  # config section, batch key prefix, position in MODALITIES
  field: str  # the manifest field that holds it (docs/data.md)
  objective: str  # its masked objective, named as in the paper; config.loss[objective] weighs it
  discrete: bool  # tokens from the shared vocabulary (True) or continuous patches
  # Batch keys the masks are drawn from, dropped before a batch leaves the pipeline.
  mask_keys: tuple = ()

  def reads_features(self, c) -> bool:
    """Whether the config reads pre-extracted features instead of the media."""
    return False

  def presence_field(self, c) -> str:
    """The stored presence field (bool per modality) that says whether a product has this
    modality in the form the config reads."""
    return 'features_present' if self.reads_features(c) else 'present'

  def positions(self, c) -> int:
    """Input positions per example ({name}_input's second axis)."""
    raise NotImplementedError

  def num_tokens(self, c) -> int:
    """Encoder tokens, the global token included."""
    raise NotImplementedError

  def preprocess(self, ex: dict, present: bool, c) -> dict:
    """A stored product -> {name}_input, {name}_valid (and any mask_keys); zeros if absent."""
    raise NotImplementedError

  def maskable(self, ex: dict, c) -> np.ndarray:
    """bool [positions]: where the masked objective may choose positions."""
    return ex[f'{self.name}_valid']

  def draw_mask(self, ex: dict, rng: np.random.Generator, c) -> np.ndarray:
    """bool [positions]: the positions the masked objective predicts, c['mask_rate'] of them."""
    maskable = self.maskable(ex, c)
    return maskable & (rng.random(maskable.shape) < c['mask_rate'])

  def limit_masked(self, masked: np.ndarray, rng: np.random.Generator, c) -> np.ndarray:
    """The mask cut down to what the head decodes (TokenModality: max_masked); unchanged here."""
    del rng, c
    return masked

  def batch_spec(self, c, train: bool, masked: bool) -> dict:
    """{key: (shape per example, dtype)} of this modality's arrays in a batch."""
    raise NotImplementedError

  def head_flops(self, c, width: int, vocab_size: int) -> int:
    """Forward FLOPs per example of the masked objective's head."""
    raise NotImplementedError

  def embed_flops(self, c, width: int) -> int:
    """Forward FLOPs per example of turning inputs into width-sized tokens (0: a lookup)."""
    return 0

  def check(self, c) -> list:
    """Problems with the config section, each naming the field and a value that works."""
    problems = []
    if not 0 <= c['mask_rate'] < 1:
      problems.append(f'config.{self.name}.mask_rate={c["mask_rate"]} must be in [0, 1); '
                      f'e.g. 0.15')
    return problems


class TokenModality(Modality):
  """Token ids [max_len] from the shared vocabulary; [CLS] first (the global token)."""
  discrete = True

  def positions(self, c) -> int:
    return c['max_len']

  def num_tokens(self, c) -> int:
    return c['max_len']

  def maskable(self, ex, c):
    tokens = ex[f'{self.name}_input']
    return ex[f'{self.name}_valid'] & (tokens != CLS) & (tokens != SEP)

  def limit_masked(self, masked, rng, c):
    """At most c['max_masked'] masked positions (0: no limit), as BERT's max_predictions_per_seq:
    a row with more keeps a random max_masked of them, so the model decodes max_masked positions
    per row, not max_len (tokens nobody predicts need no logits over the vocabulary). Rows within
    the limit keep their mask and the random stream unchanged."""
    limit = c.get('max_masked', 0)
    chosen = np.flatnonzero(masked)
    if not limit or len(chosen) <= limit:
      return masked
    kept = np.zeros_like(masked)
    kept[rng.choice(chosen, limit, replace=False)] = True
    return kept

  def decoded_positions(self, c) -> int:
    """Positions the head decodes per example: max_masked, or every one."""
    return c.get('max_masked', 0) or self.positions(c)

  def corrupt(self, tokens, masked, rng, replacement_ids) -> np.ndarray:
    """BERT's corruption of the masked positions: 80% [MASK], 10% a random token of the
    tokenizer's vocabulary (`replacement_ids`), 10% unchanged."""
    u = rng.random(tokens.shape)
    random_tokens = replacement_ids[rng.integers(len(replacement_ids), size=tokens.shape)]
    tokens = np.where(masked & (u < 0.8), MASK, tokens)
    return np.where(masked & (u >= 0.8) & (u < 0.9), random_tokens, tokens).astype(np.int32)

  def batch_spec(self, c, train, masked):
    length = (self.positions(c),)
    spec = {f'{self.name}_input': (length, np.int32), f'{self.name}_valid': (length, np.bool_)}
    if train and masked:
      spec[f'{self.name}_masked'] = (length, np.bool_)
      spec[f'{self.name}_target'] = (length, np.int32)
    return spec

  def head_flops(self, c, width, vocab_size):
    # dense transform, then logits over the vocabulary (tied to the token embedding), at the
    # decoded positions only
    t = self.decoded_positions(c)
    return 2 * t * width * width + 2 * t * width * vocab_size

  def check(self, c):
    problems = super().check(c)
    if c['max_len'] < 3:
      problems.append(f'config.{self.name}.max_len={c["max_len"]} leaves no room for a token '
                      f'between [CLS] and [SEP]; e.g. 16')
    if not 0 <= c.get('max_masked', 0) <= c['max_len']:
      problems.append(f'config.{self.name}.max_masked={c["max_masked"]} must be in [0, max_len='
                      f'{c["max_len"]}] (0: decode every position); e.g. '
                      f'{min(c["max_len"], max(1, round(2 * c["mask_rate"] * c["max_len"])))}')
    return problems


class PatchModality(Modality):
  """Continuous vectors [positions, patch_dim], from decoded media (`source='media'`) or from
  pre-extracted features (`source='features'`: the first feature_tokens rows of the product's
  stored [tokens, feature_dim] array)."""
  discrete = False

  def reads_features(self, c):
    return c['source'] == 'features'

  def media_positions(self, c) -> int:
    raise NotImplementedError

  def media_patch_dim(self, c) -> int:
    raise NotImplementedError

  def preprocess_media(self, ex, present, c) -> dict:
    raise NotImplementedError

  def check_bytes(self, data: bytes) -> None:
    """A cheap decode of a stored media file at any size (the build's check); raises
    scale_jax.data.media.MediaError if it does not decode."""
    raise NotImplementedError

  def positions(self, c):
    return c['feature_tokens'] if self.reads_features(c) else self.media_positions(c)

  def patch_dim(self, c) -> int:
    """Values per position: what the patch embedding reads and the head regresses."""
    return c['feature_dim'] if self.reads_features(c) else self.media_patch_dim(c)

  def num_tokens(self, c):
    return self.positions(c) + 1

  def preprocess(self, ex, present, c):
    if not self.reads_features(c):
      return self.preprocess_media(ex, present, c)
    from scale_jax.data import media  # pylint: disable=g-import-not-at-top  (decoders: data only)
    out = np.zeros((c['feature_tokens'], c['feature_dim']), np.float32)
    count = 0
    if present:
      x = media.decode_features(ex[f'{self.name}_features'])[:c['feature_tokens']]
      if x.shape[1] != c['feature_dim']:
        item = ex['item_id'].decode() if isinstance(ex['item_id'], bytes) else ex['item_id']
        raise ValueError(f'product {item}: {self.name} features have {x.shape[1]} values per '
                         f'token but config.{self.name}.feature_dim is {c["feature_dim"]}')
      count = len(x)
      out[:count] = x
    return {f'{self.name}_input': out, f'{self.name}_valid': np.arange(len(out)) < count}

  def batch_spec(self, c, train, masked):
    length = (self.positions(c),)
    spec = {f'{self.name}_input': (length + (self.patch_dim(c),), np.float32),
            f'{self.name}_valid': (length, np.bool_)}
    if train and masked:
      spec[f'{self.name}_masked'] = (length, np.bool_)
    return spec

  def head_flops(self, c, width, vocab_size):
    return 2 * self.positions(c) * width * self.patch_dim(c)

  def embed_flops(self, c, width):
    return 2 * self.positions(c) * self.patch_dim(c) * width

  def check(self, c):
    problems = super().check(c)
    if c['source'] not in ('media', 'features'):
      problems.append(f"config.{self.name}.source={c['source']!r}: 'media' or 'features'")
    elif self.reads_features(c):
      for key in ('feature_tokens', 'feature_dim'):
        if c[key] < 1:
          problems.append(f'config.{self.name}.{key}={c[key]}: features mode needs the stored '
                          f'array\'s size, e.g. --config.{self.name}.{key}='
                          f'{36 if key == "feature_tokens" else 2048}')
    else:
      problems += self.check_media(c)
    return problems

  def check_media(self, c) -> list:
    return []
