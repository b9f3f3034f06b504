"""Transformer building blocks with logical axis names on every parameter and activation."""
import jax
import jax.numpy as jnp
from flax import linen as nn

partitioned = nn.with_logical_partitioning
constrain = nn.with_logical_constraint
dense_init = nn.initializers.xavier_uniform()


def layer_norm(name=None, dtype=jnp.float32):
  return nn.LayerNorm(epsilon=1e-6, dtype=dtype, name=name,
                      scale_init=partitioned(nn.initializers.ones, ('embed',)),
                      bias_init=partitioned(nn.initializers.zeros, ('embed',)))


class Attention(nn.Module):
  """Multi-head self-attention; `key_valid` [B, S] keeps padding and absent modalities out."""
  heads: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, key_valid):
    width = x.shape[-1]
    head_dim = width // self.heads
    qkv = nn.DenseGeneral(
        (3, self.heads, head_dim), dtype=self.dtype, name='qkv',
        kernel_init=partitioned(dense_init, ('embed', None, 'heads', 'kv')),
        bias_init=partitioned(nn.initializers.zeros, (None, 'heads', 'kv')))(x)
    q, k, v = (constrain(qkv[:, :, i], ('batch', 'length', 'heads', 'kv')) for i in range(3))
    # One fused XLA attention (cuDNN flash attention on GPU where shapes allow).
    out = jax.nn.dot_product_attention(q, k, v, mask=key_valid[:, None, None, :])
    return nn.DenseGeneral(
        width, axis=(-2, -1), dtype=self.dtype, name='out',
        kernel_init=partitioned(dense_init, ('heads', 'kv', 'embed')),
        bias_init=partitioned(nn.initializers.zeros, ('embed',)))(out)


class Block(nn.Module):
  """Pre-LayerNorm transformer block. Under nn.scan (`scanned`) it returns (x, None)."""
  heads: int
  mlp_dim: int
  dtype: jnp.dtype = jnp.float32
  scanned: bool = False

  @nn.compact
  def __call__(self, x, key_valid):
    x = constrain(x, ('batch', 'length', 'embed'))
    x = x + Attention(self.heads, self.dtype, name='attention')(
        layer_norm('ln_attention', self.dtype)(x), key_valid)
    h = layer_norm('ln_mlp', self.dtype)(x)
    h = nn.Dense(self.mlp_dim, dtype=self.dtype, name='mlp_in',
                 kernel_init=partitioned(dense_init, ('embed', 'mlp')),
                 bias_init=partitioned(nn.initializers.zeros, ('mlp',)))(h)
    h = constrain(nn.gelu(h), ('batch', 'length', 'mlp'))
    h = nn.Dense(x.shape[-1], dtype=self.dtype, name='mlp_out',
                 kernel_init=partitioned(dense_init, ('mlp', 'embed')),
                 bias_init=partitioned(nn.initializers.zeros, ('embed',)))(h)
    x = x + h
    return (x, None) if self.scanned else x


# model.remat: what the backward pass keeps from the forward pass of each block.
REMAT_POLICIES = {
    'none': None,  # keep everything (no rematerialisation)
    'full': jax.checkpoint_policies.nothing_saveable,  # recompute the whole block
    'dots': jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,  # keep matmul outputs
}


class Encoder(nn.Module):
  """A stack of blocks with a final LayerNorm; optionally rematerialised and/or scanned (one
  compiled block, parameters stacked along a leading 'layers' axis)."""
  layers: int
  heads: int
  mlp_dim: int
  dtype: jnp.dtype = jnp.float32
  remat: str = 'none'
  scan: bool = False

  @nn.compact
  def __call__(self, x, key_valid):
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f'model.remat must be one of {list(REMAT_POLICIES)}, not {self.remat!r}')
    block = Block
    if self.remat != 'none':
      block = nn.remat(Block, policy=REMAT_POLICIES[self.remat], prevent_cse=not self.scan)
    if self.scan:
      stack = nn.scan(block, variable_axes={'params': 0}, split_rngs={'params': True},
                      in_axes=nn.broadcast, length=self.layers,
                      metadata_params={nn.PARTITION_NAME: 'layers'})
      x, _ = stack(self.heads, self.mlp_dim, self.dtype, scanned=True, name='blocks')(x, key_valid)
    else:
      for i in range(self.layers):
        x = block(self.heads, self.mlp_dim, self.dtype, name=f'block_{i}')(x, key_valid)
    return layer_norm('ln_final', self.dtype)(x)
