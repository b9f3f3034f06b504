"""SCALE: per-modality encoders, a joint co-transformer over all tokens, and the heads of the
contrastive and masked objectives (docs/method.md). What each modality is (tokens or patches, its
token count, whether it is masked) comes from scale_jax.modalities."""
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from scale_jax import modalities
from scale_jax.losses import l2_normalize
from scale_jax.model.layers import (Encoder, constrain, dense_init, dot_general_for, layer_norm,
                                   partitioned)

# Modalities that can share an encoder (model.share_text_table, model.share_image_video).
SHARED_ENCODERS = {'share_text_table': ('text', 'table'), 'share_image_video': ('image', 'video')}


def _param(module, name, shape, axes, init=nn.initializers.normal(0.02)):
  return module.param(name, partitioned(init, axes), shape)


def encoder_shape(m, modality: str) -> tuple[int, int]:
  """(heads, MLP width) of a modality's encoder: model.heads and mlp_dim, or for the image,
  video and audio encoders model.media_heads and media_mlp_dim where set (the released code's
  media encoders are narrower than its text encoder)."""
  if modalities.get(modality).discrete:
    return m.heads, m.mlp_dim
  return m.get('media_heads', 0) or m.heads, m.get('media_mlp_dim', 0) or m.mlp_dim


class Scale(nn.Module):
  """Maps a batch (scale_jax.data.pipeline format) to the embeddings and predictions that
  scale_jax.losses turns into the SCALE objective. `config` is the whole (frozen) run config;
  with a `mesh` (jax.sharding.Mesh) every activation constraint of the model takes effect."""
  config: object
  mesh: Any = None

  def setup(self):
    c, m = self.config, self.config.model
    self.modalities = modalities.active(c)
    self.dtype = jnp.dtype(m.dtype)
    specs = {k: modalities.get(k) for k in self.modalities}
    counts = {k: specs[k].num_tokens(c[k]) for k in self.modalities}
    dims = {k: specs[k].patch_dim(c[k]) for k in self.modalities if not specs[k].discrete}
    matmul = m.get('matmul', 'float32')  # configs saved before the field existed: float32
    dot_general = dot_general_for(matmul)  # of every Dense here and in the encoders
    attention = m.get('attention', 'jax')  # of every block (configs saved before it: 'jax')
    encoder = lambda k: Encoder(m.encoder_layers, *encoder_shape(m, k), self.dtype, m.remat,
                                m.scan_layers, matmul, attention, self.mesh)
    owner = {k: k for k in self.modalities}  # whose encoder each modality runs through
    for switch, (a, b) in SHARED_ENCODERS.items():
      if m[switch] and a in owner and b in owner:
        owner[b] = a  # b shares a's encoder: one set of parameters, named after a
    self.encoder_owner = owner
    self.encoders = {k: encoder(k) for k in self.modalities if owner[k] == k}
    if any(s.discrete for s in specs.values()):
      # Text and table share one vocabulary, so they share one token embedding (and the MLM/MEM
      # decoders are tied to it).
      self.token_embed = nn.Embed(m.vocab_size, m.width, embedding_init=partitioned(
          nn.initializers.normal(0.02), ('vocab', 'embed')))
    self.patch_embed = {k: nn.Dense(m.width, dtype=self.dtype, dot_general=dot_general,
                                    kernel_init=partitioned(dense_init, ('patch', 'embed')),
                                    bias_init=partitioned(nn.initializers.zeros, ('embed',)))
                        for k in dims}
    self.projections = {k: nn.Dense(m.embed_dim, dtype=self.dtype, use_bias=False,
                                    dot_general=dot_general,
                                    kernel_init=partitioned(dense_init, ('embed', None)))
                        for k in self.modalities}
    self.positions = {k: _param(self, f'{k}_position', (counts[k], m.width), ('length', 'embed'))
                      for k in self.modalities}
    self.global_tokens = {k: _param(self, f'{k}_global', (m.width,), ('embed',)) for k in dims}
    self.mask_tokens = {k: _param(self, f'{k}_mask', (m.width,), ('embed',)) for k in dims}
    if m.type_embedding:
      self.type_embed = _param(self, 'type_embed', (len(self.modalities), m.width),
                               ('modality', 'embed'))
    if m.joint_layers:
      self.joint = Encoder(m.joint_layers, m.heads, m.mlp_dim, self.dtype, m.remat, m.scan_layers,
                           matmul, attention, self.mesh)
    predicted = modalities.masked(c)  # only the masked modalities get a head
    if any(specs[k].discrete for k in predicted):
      self.token_head = nn.Sequential([
          nn.Dense(m.width, dtype=self.dtype, dot_general=dot_general,
                   kernel_init=partitioned(dense_init, ('embed', 'mlp')),
                   bias_init=partitioned(nn.initializers.zeros, ('mlp',))),
          nn.gelu, layer_norm(dtype=self.dtype)])
      self.token_bias = _param(self, 'token_bias', (m.vocab_size,), ('vocab',),
                               nn.initializers.zeros)
    self.patch_heads = {k: nn.Dense(dims[k], dtype=self.dtype, dot_general=dot_general,
                                    kernel_init=partitioned(dense_init, ('embed', 'patch')),
                                    bias_init=partitioned(nn.initializers.zeros, ('patch',)))
                        for k in predicted if k in dims}
    if m.learn_temperature:
      self.log_temperature = self.param('log_temperature', nn.initializers.constant(
          np.log(m.temperature)), ())
    if m.weighting == 'learned':  # G = exp(-s), one s per term (losses.harmonized_weights)
      self.log_variances = self.param('log_variances', nn.initializers.zeros,
                                      (len(self.modalities),) * 2)

  def embed(self, modality, batch):
    """Input tokens [B, L, D] (global token first) and their validity [B, L]."""
    x, valid = batch[f'{modality}_input'], batch[f'{modality}_valid']
    present = batch['present'][:, self.modalities.index(modality)]
    if modalities.get(modality).discrete:
      h = self.token_embed(x).astype(self.dtype)
      valid = valid.at[:, 0].set(present)  # the [CLS] token
    else:
      h = self.patch_embed[modality](x.astype(self.dtype))
      masked = batch.get(f'{modality}_masked')  # only in training batches of masked modalities
      if masked is not None:  # masked patches/frames are replaced, so the model cannot see them
        h = jnp.where(masked[..., None], self.mask_tokens[modality].astype(self.dtype), h)
      glob = jnp.broadcast_to(self.global_tokens[modality].astype(self.dtype),
                              (h.shape[0], 1, h.shape[-1]))
      h = jnp.concatenate([glob, h], axis=1)
      valid = jnp.concatenate([present[:, None], valid], axis=1)
    h = h + self.positions[modality].astype(self.dtype)
    return constrain(h, ('batch', 'length', 'embed'), self.mesh), valid

  def __call__(self, batch):
    m = self.config.model
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    present = batch['present']
    encoded, tokens, valids = {}, [], []
    for i, k in enumerate(self.modalities):
      h, valid = self.embed(k, batch)
      # The global token always attends, so no attention row is empty for an absent modality.
      encoded[k] = h = self.encoders[self.encoder_owner[k]](h, valid.at[:, 0].set(True))
      if m.type_embedding:
        h = h + self.type_embed[i].astype(self.dtype)
      if m.absent == 'zero':  # released code: absent modalities attended to as zero vectors
        h = jnp.where(present[:, i, None, None], h, 0)
        valid = jnp.where(present[:, i, None], valid, True)
      tokens.append(h)
      valids.append(valid)
    z = jnp.stack([self.projections[k](encoded[k][:, 0]) for k in self.modalities], axis=1)
    z = l2_normalize(z.astype(jnp.float32))

    fused = jnp.concatenate(tokens, axis=1)
    if m.joint_layers:
      fused = self.joint(fused, jnp.concatenate(valids, axis=1))
    starts = np.cumsum([0] + [t.shape[1] for t in tokens])
    fused_tokens = {k: fused[:, starts[i]:starts[i + 1]] for i, k in enumerate(self.modalities)}
    # The paper predicts masked tokens from the joint outputs; the released code from each
    # modality's own encoder.
    source = fused_tokens if m.masked_heads_on == 'joint' else encoded
    predictions, decoded = {}, {}
    for k in modalities.masked(self.config):
      if modalities.get(k).discrete:
        h, masked = source[k], batch.get(f'{k}_masked')
        limit = modalities.get(k).decoded_positions(self.config[k])  # config.<k>.max_masked
        if limit < h.shape[1] and masked is not None:  # only the (at most `limit`) masked ones
          decoded[k] = jnp.argsort(~masked, axis=1, stable=True)[:, :limit]  # masked first
          h = jnp.take_along_axis(h, decoded[k][..., None], axis=1)
        h = self.token_head(h)
        predictions[k] = self.token_embed.attend(h.astype(jnp.float32)) + self.token_bias
      else:
        predictions[k] = self.patch_heads[k](source[k][:, 1:]).astype(jnp.float32)
    out = {'z': z,  # [B, M, E] unit contrastive embeddings, before fusion
           'fused': jnp.stack([fused_tokens[k][:, 0] for k in self.modalities], 1).astype(
               jnp.float32),  # [B, M, D] each modality's global token after fusion
           'predictions': predictions,  # [B, L, ...], or [B, max_masked, ...] at `decoded`
           'decoded': decoded,  # [B, max_masked] positions of each limited token modality
           'temperature': (jnp.exp(self.log_temperature) if m.learn_temperature
                           else jnp.float32(m.temperature))}
    if m.weighting == 'learned':
      out['log_variances'] = self.log_variances
    return out
