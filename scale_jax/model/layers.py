"""Transformer building blocks with logical axis names on every parameter and activation."""
import math

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from scale_jax import sharding

partitioned = nn.with_logical_partitioning
dense_init = nn.initializers.xavier_uniform()


# model.matmul='bf16_operands': every Dense/DenseGeneral multiplies bf16 copies of its input and
# kernel with f32 accumulation and f32 output; parameters, gradients, optimizer state and all
# other arithmetic stay f32. On a CPU with AVX512_BF16 this runs XLA:CPU's YNNPACK bf16 kernel at
# about twice the f32 matmul rate, but XLA takes that path only for a 2-D dot whose operands are
# row-major with the LHS contracted on its last axis (the RHS on either). Otherwise it upcasts the
# operands to f32 (slower than plain f32), which is what autodiff's dW = x^T dy does. Hence a
# custom VJP: dx = dy W^T is already in the fast form; dW needs x^T as a real row-major copy.
def _dot(a, b, contract_b):
  """a [M, K] times b ([K, N] if contract_b == 0, [N, K] if 1), f32 accumulation and output."""
  return jax.lax.dot_general(a, b, (((1,), (contract_b,)), ((), ())),
                             preferred_element_type=jnp.float32)


def _row_major_transpose(a):
  """a.T materialised row-major. A plain a.T gets folded into the dot (or laid out column-major),
  which sends XLA:CPU back to its f32 path; the reshape behind an optimization barrier forces a
  bf16 transpose copy (cheap next to the f32 fallback; docs/benchmarks.md)."""
  m, k = a.shape
  return jax.lax.optimization_barrier(a.T.reshape(1, k, m)).reshape(k, m)


@jax.custom_vjp
def _bf16_matmul(x, w):
  """x [M, K] @ w [K, N], both f32, through bf16 operands; f32 result and gradients."""
  return _dot(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), 0)


def _bf16_matmul_fwd(x, w):
  xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
  return _dot(xb, wb, 0), (xb, wb)  # keeps x for the backward in bf16: half the f32 memory


def _bf16_matmul_bwd(res, dy):
  xb, wb = res
  dyb = dy.astype(jnp.bfloat16)
  dx = _dot(dyb, wb, 1)  # dy [M, N] W^T: W [K, N] contracted on its last axis
  dw = _dot(_row_major_transpose(xb), dyb, 0)  # x^T [K, M] dy [M, N]
  return dx, dw


_bf16_matmul.defvjp(_bf16_matmul_fwd, _bf16_matmul_bwd)


def bf16_operands_dot_general(lhs, rhs, dimension_numbers, precision=None,
                              preferred_element_type=None):
  """lax.dot_general's signature for flax's `dot_general=`, in bf16 operands / f32 accumulation.
  Handles what Dense and DenseGeneral ask for: lhs's trailing axes contracted with rhs's leading
  ones, no batch axes; flattened to one 2-D matmul."""
  del precision, preferred_element_type
  (lc, rc), (lb, rb) = dimension_numbers
  n = len(lc)
  lc = tuple(a % lhs.ndim for a in lc)
  if lb or rb or lc != tuple(range(lhs.ndim - n, lhs.ndim)) or tuple(rc) != tuple(range(n)):
    raise NotImplementedError(f'bf16_operands_dot_general: dimension numbers {dimension_numbers}')
  outer, inner = lhs.shape[:lhs.ndim - n], lhs.shape[lhs.ndim - n:]
  f32 = jnp.float32
  out = _bf16_matmul(lhs.reshape(-1, math.prod(inner)).astype(f32),
                     rhs.reshape(math.prod(inner), -1).astype(f32))
  return out.reshape(outer + rhs.shape[n:]).astype(jnp.result_type(lhs, rhs))


# model.matmul -> the `dot_general` of every Dense/DenseGeneral (None: flax's lax.dot_general).
MATMULS = {'float32': None, 'bf16_operands': bf16_operands_dot_general}


def dot_general_for(matmul: str):
  if matmul not in MATMULS:
    raise ValueError(f'model.matmul must be one of {list(MATMULS)}, not {matmul!r}')
  return MATMULS[matmul]


def layer_norm(name=None, dtype=jnp.float32):
  return nn.LayerNorm(epsilon=1e-6, dtype=dtype, name=name,
                      scale_init=partitioned(nn.initializers.ones, ('embed',)),
                      bias_init=partitioned(nn.initializers.zeros, ('embed',)))


def constrain(x, logical_axes, mesh):
  """Pins activation `x` to the sharding its logical axes map to on `mesh`; a no-op without a
  mesh (init, single-device use). Rules and mesh go to the constraint explicitly: flax's global
  logical_axis_rules context would also re-map the flattened kernels inside DenseGeneral."""
  if mesh is None:
    return x
  return nn.with_logical_constraint(x, logical_axes, rules=sharding.LOGICAL_RULES, mesh=mesh)


class Attention(nn.Module):
  """Multi-head self-attention; `key_valid` [B, S] keeps padding and absent modalities out."""
  heads: int
  dtype: jnp.dtype = jnp.float32
  matmul: str = 'float32'
  mesh: Any = None  # a jax.sharding.Mesh: activations are constrained to it (see constrain)

  @nn.compact
  def __call__(self, x, key_valid):
    width = x.shape[-1]
    head_dim = width // self.heads
    qkv = nn.DenseGeneral(
        (3, self.heads, head_dim), dtype=self.dtype, name='qkv',
        dot_general=dot_general_for(self.matmul),
        kernel_init=partitioned(dense_init, ('embed', None, 'heads', 'kv')),
        bias_init=partitioned(nn.initializers.zeros, (None, 'heads', 'kv')))(x)
    q, k, v = (constrain(qkv[:, :, i], ('batch', 'length', 'heads', 'kv'), self.mesh)
               for i in range(3))
    # One fused XLA attention (cuDNN flash attention on GPU where shapes allow).
    out = jax.nn.dot_product_attention(q, k, v, mask=key_valid[:, None, None, :])
    return nn.DenseGeneral(
        width, axis=(-2, -1), dtype=self.dtype, name='out',
        dot_general=dot_general_for(self.matmul),
        kernel_init=partitioned(dense_init, ('heads', 'kv', 'embed')),
        bias_init=partitioned(nn.initializers.zeros, ('embed',)))(out)


class Block(nn.Module):
  """Pre-LayerNorm transformer block. Under nn.scan (`scanned`) it returns (x, None)."""
  heads: int
  mlp_dim: int
  dtype: jnp.dtype = jnp.float32
  scanned: bool = False
  matmul: str = 'float32'
  mesh: Any = None

  @nn.compact
  def __call__(self, x, key_valid):
    x = constrain(x, ('batch', 'length', 'embed'), self.mesh)
    dot_general = dot_general_for(self.matmul)
    x = x + Attention(self.heads, self.dtype, self.matmul, self.mesh, name='attention')(
        layer_norm('ln_attention', self.dtype)(x), key_valid)
    h = layer_norm('ln_mlp', self.dtype)(x)
    h = nn.Dense(self.mlp_dim, dtype=self.dtype, name='mlp_in', dot_general=dot_general,
                 kernel_init=partitioned(dense_init, ('embed', 'mlp')),
                 bias_init=partitioned(nn.initializers.zeros, ('mlp',)))(h)
    h = constrain(nn.gelu(h), ('batch', 'length', 'mlp'), self.mesh)
    h = nn.Dense(x.shape[-1], dtype=self.dtype, name='mlp_out', dot_general=dot_general,
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
  matmul: str = 'float32'
  mesh: Any = None

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
      x, _ = stack(self.heads, self.mlp_dim, self.dtype, scanned=True, matmul=self.matmul,
                   mesh=self.mesh, name='blocks')(x, key_valid)
    else:
      for i in range(self.layers):
        x = block(self.heads, self.mlp_dim, self.dtype, matmul=self.matmul, mesh=self.mesh,
                  name=f'block_{i}')(x, key_valid)
    return layer_norm('ln_final', self.dtype)(x)
