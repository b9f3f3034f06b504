"""The caption: `[CLS] word pieces [SEP]`, masked language modelling (MLM)."""
from scale_jax.modalities.base import CLS, SEP, TokenModality, pad_tokens


class Text(TokenModality):
  name, field, objective = 'text', 'caption', 'mlm'

  def preprocess(self, ex, present, c):
    """[CLS] caption [SEP], truncated to max_len; MLM picks among the word pieces."""
    caption = list(ex['caption_tokens'][:c['max_len'] - 2])
    tokens = pad_tokens([CLS] + caption + [SEP], c['max_len'])
    return {'text_input': tokens, 'text_valid': (tokens != 0) & present}


TEXT = Text()
