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
  """Pre-LayerNorm transformer block."""
  heads: int
  mlp_dim: int
  dtype: jnp.dtype = jnp.float32

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
    return x + h


class Encoder(nn.Module):
  """A stack of blocks with a final LayerNorm."""
  layers: int
  heads: int
  mlp_dim: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, key_valid):
    for i in range(self.layers):
      x = Block(self.heads, self.mlp_dim, self.dtype, name=f'block_{i}')(x, key_valid)
    return layer_norm('ln_final', self.dtype)(x)
