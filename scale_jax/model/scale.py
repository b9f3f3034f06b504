"""SCALE: per-modality encoders, a joint co-transformer over all tokens, and the heads of the
contrastive and masked objectives (../shared/spec/scale-method.md, section Model)."""
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from scale_jax import MODALITIES
from scale_jax.data.pipeline import TOKEN_MODALITIES, patch_dims, token_counts
from scale_jax.losses import l2_normalize
from scale_jax.model.layers import Encoder, constrain, dense_init, layer_norm, partitioned


def _param(module, name, shape, axes, init=nn.initializers.normal(0.02)):
  return module.param(name, partitioned(init, axes), shape)


class Scale(nn.Module):
  """Maps a batch (scale_jax.data.pipeline format) to the embeddings and predictions that
  scale_jax.losses turns into the SCALE objective. `config` is the whole (frozen) run config."""
  config: object

  def setup(self):
    c, m = self.config, self.config.model
    self.dtype = jnp.dtype(m.dtype)
    counts = token_counts(c)
    # Text and table share one vocabulary, so they share one token embedding (and the MLM/MEM
    # decoders are tied to it).
    self.token_embed = nn.Embed(m.vocab_size, m.width,
                                embedding_init=partitioned(nn.initializers.normal(0.02),
                                                           ('vocab', 'embed')))
    self.patch_embed = {k: nn.Dense(m.width, dtype=self.dtype,
                                    kernel_init=partitioned(dense_init, ('patch', 'embed')),
                                    bias_init=partitioned(nn.initializers.zeros, ('embed',)))
                        for k in patch_dims(c)}
    self.encoders = {k: Encoder(m.encoder_layers, m.heads, m.mlp_dim, self.dtype)
                     for k in MODALITIES}
    self.projections = {k: nn.Dense(m.embed_dim, dtype=self.dtype,
                                    kernel_init=partitioned(dense_init, ('embed', None)),
                                    use_bias=False) for k in MODALITIES}
    self.positions = {k: _param(self, f'{k}_position', (counts[k], m.width), ('length', 'embed'))
                      for k in MODALITIES}
    self.global_tokens = {k: _param(self, f'{k}_global', (m.width,), ('embed',))
                          for k in patch_dims(c)}
    self.mask_tokens = {k: _param(self, f'{k}_mask', (m.width,), ('embed',))
                        for k in patch_dims(c)}
    if m.type_embedding:
      self.type_embed = _param(self, 'type_embed', (len(MODALITIES), m.width), ('modality', 'embed'))
    self.joint = Encoder(m.joint_layers, m.heads, m.mlp_dim, self.dtype)
    self.token_head = nn.Sequential([
        nn.Dense(m.width, dtype=self.dtype, kernel_init=partitioned(dense_init, ('embed', 'mlp')),
                 bias_init=partitioned(nn.initializers.zeros, ('mlp',))),
        nn.gelu, layer_norm(dtype=self.dtype)])
    self.token_bias = _param(self, 'token_bias', (m.vocab_size,), ('vocab',), nn.initializers.zeros)
    self.patch_heads = {k: nn.Dense(d, dtype=self.dtype,
                                    kernel_init=partitioned(dense_init, ('embed', 'patch')),
                                    bias_init=partitioned(nn.initializers.zeros, ('patch',)))
                        for k, d in patch_dims(c).items()}
    if m.learn_temperature:
      self.log_temperature = self.param('log_temperature', nn.initializers.constant(
          np.log(m.temperature)), ())

  def embed(self, modality, batch):
    """Input tokens [B, L, D] (global token first) and their validity [B, L]."""
    x, valid = batch[f'{modality}_input'], batch[f'{modality}_valid']
    present = batch['present'][:, MODALITIES.index(modality)]
    if modality in TOKEN_MODALITIES:
      h = self.token_embed(x).astype(self.dtype)
      valid = valid.at[:, 0].set(present)  # the [CLS] token
    else:
      h = self.patch_embed[modality](x.astype(self.dtype))
      masked = batch.get(f'{modality}_masked')
      if masked is not None:  # masked patches/frames are replaced, so the model cannot see them
        h = jnp.where(masked[..., None], self.mask_tokens[modality].astype(self.dtype), h)
      glob = jnp.broadcast_to(self.global_tokens[modality].astype(self.dtype),
                              (h.shape[0], 1, h.shape[-1]))
      h = jnp.concatenate([glob, h], axis=1)
      valid = jnp.concatenate([present[:, None], valid], axis=1)
    h = h + self.positions[modality].astype(self.dtype)
    return constrain(h, ('batch', 'length', 'embed')), valid

  def __call__(self, batch):
    m = self.config.model
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    present = batch['present']
    tokens, valids, pooled = [], [], []
    for i, k in enumerate(MODALITIES):
      h, valid = self.embed(k, batch)
      # The global token always attends, so no attention row is empty for an absent modality.
      h = self.encoders[k](h, valid.at[:, 0].set(True))
      pooled.append(h[:, 0])
      if m.type_embedding:
        h = h + self.type_embed[i].astype(self.dtype)
      if m.absent == 'zero':  # released code: absent modalities attended to as zero vectors
        h = jnp.where(present[:, i, None, None], h, 0)
        valid = jnp.where(present[:, i, None], valid, True)
      tokens.append(h)
      valids.append(valid)
    z = jnp.stack([self.projections[k](p) for k, p in zip(MODALITIES, pooled)], axis=1)
    z = l2_normalize(z.astype(jnp.float32))

    fused = self.joint(jnp.concatenate(tokens, axis=1), jnp.concatenate(valids, axis=1))
    starts = np.cumsum([0] + [t.shape[1] for t in tokens])
    fused_tokens = {k: fused[:, starts[i]:starts[i + 1]] for i, k in enumerate(MODALITIES)}
    predictions = {}
    for k in TOKEN_MODALITIES:
      h = self.token_head(fused_tokens[k])
      predictions[k] = self.token_embed.attend(h.astype(jnp.float32)) + self.token_bias
    for k, head in self.patch_heads.items():
      predictions[k] = head(fused_tokens[k][:, 1:]).astype(jnp.float32)
    temperature = (jnp.exp(self.log_temperature) if m.learn_temperature
                   else jnp.float32(m.temperature))
    return {'z': z,  # [B, M, E] unit contrastive embeddings, before fusion
            'fused': jnp.stack([fused_tokens[k][:, 0] for k in MODALITIES], 1).astype(jnp.float32),
            'predictions': predictions, 'temperature': temperature}
