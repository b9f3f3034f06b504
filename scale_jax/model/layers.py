"""Transformer building blocks with logical axis names on every parameter and activation."""
import functools
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
# custom VJP: dx = dy W^T is already in the fast form; dW needs a real row-major transposed copy
# of x, or of dy (dW^T = dy^T x, then transposed), whichever is narrower.
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
  if dyb.shape[1] < xb.shape[1]:  # fewer output features than input ones, e.g. mlp_out
    # dW^T [N, K] = dy^T [N, M] x [M, K], then transposed: dy (materialised, as dx reads it
    # too) is the narrower copy, and x gets none. A transposed copy of x is fused with x's
    # producer, which XLA:CPU then runs element by element: under remat that producer is the
    # recomputed GELU, 4x slower fused than computed and then copied (docs/benchmarks.md).
    # The barrier keeps XLA from folding the last transpose into the dot.
    dw_t = jax.lax.optimization_barrier(_dot(_row_major_transpose(dyb), xb, 0))
    dw = _row_major_transpose(dw_t)
  else:
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


# model.matmul='float32_direct_dw': plain dot_generals, with a custom VJP for the kernel gradient.
# Autodiff transposes a dense layer's dW = x^T dy into a dot of dy^T followed by a transpose of
# the result, and XLA:CPU materialises the transposed copies of dy (one per layer, the size of
# the activations) before a slower dot; contracting the token axes of x and dy in one
# dot_general gives dW straight in the kernel's layout. dx is autodiff's own form. Same
# arithmetic, same gradients (tests/test_matmul.py). Faster on one Intel Xeon, slower on the AMD
# EPYCs and on an Intel Xeon with AMX (docs/benchmarks.md): an opt-in, chosen per machine by
# benchmarks/train_step.py --matmul.
def _contracting(lhs_ndim: int, n: int):
  """Dense/DenseGeneral's dimension numbers: lhs's last n axes with rhs's first n."""
  return ((tuple(range(lhs_ndim - n, lhs_ndim)), tuple(range(n))), ((), ()))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _dense_dot(lhs, rhs, n):
  return jax.lax.dot_general(lhs, rhs, _contracting(lhs.ndim, n))


def _dense_dot_fwd(lhs, rhs, n):
  return _dense_dot(lhs, rhs, n), (lhs, rhs)


def _dense_dot_bwd(n, res, dy):
  lhs, rhs = res
  outer = lhs.ndim - n  # the batch and token axes
  # dx [outer..., K...] = dy [outer..., N...] . rhs [K..., N...] over N
  dx = jax.lax.dot_general(dy, rhs, ((tuple(range(outer, dy.ndim)), tuple(range(n, rhs.ndim))),
                                     ((), ())))
  # dW [K..., N...] = lhs [outer..., K...] . dy [outer..., N...] over the outer axes
  dw = jax.lax.dot_general(lhs, dy, ((tuple(range(outer)), tuple(range(outer))), ((), ())))
  return dx.astype(lhs.dtype), dw.astype(rhs.dtype)


_dense_dot.defvjp(_dense_dot_fwd, _dense_dot_bwd)


def direct_dw_dot_general(lhs, rhs, dimension_numbers, precision=None,
                          preferred_element_type=None):
  """lax.dot_general's signature for flax's `dot_general=`, for what Dense and DenseGeneral ask
  (lhs's trailing axes contracted with rhs's leading ones, no batch axes), with the direct dW."""
  del precision, preferred_element_type
  (lc, rc), (lb, rb) = dimension_numbers
  n = len(lc)
  if lb or rb or tuple(a % lhs.ndim for a in lc) != _contracting(lhs.ndim, n)[0][0] or (
      tuple(rc) != tuple(range(n))):
    raise NotImplementedError(f'direct_dw_dot_general: dimension numbers {dimension_numbers}')
  return _dense_dot(lhs, rhs, n)


# model.matmul -> the `dot_general` of every Dense/DenseGeneral (None: flax's lax.dot_general
# with autodiff's gradient, the default and the reference the other two are tested against).
MATMULS = {'float32': None, 'float32_direct_dw': direct_dw_dot_general,
           'bf16_operands': bf16_operands_dot_general}


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


# model.attention: how the attention core (scores, mask, softmax, weighted values) is written.
# 'jax' is jax.nn.dot_product_attention, whose einsums take q, k and v as [batch, length, heads,
# head_dim]. 'heads_major' is the same arithmetic on [batch, heads, length, head_dim] copies, so
# that every batched dot, forward and backward, has its batch axes leading: XLA:CPU then writes
# fewer layout copies around them (on AMD Zen 5 the whole clip_peer step 1.06x to 1.11x with
# bf16_operands, about level in f32: docs/benchmarks.md). Same outputs and gradients to rounding
# (tests/test_attention.py). Choose per machine with benchmarks/train_step.py --compare.
def jax_attention(q, k, v, key_valid):
  return jax.nn.dot_product_attention(q, k, v, mask=key_valid[:, None, None, :])


def heads_major_attention(q, k, v, key_valid):
  """softmax(q k^T / sqrt(head_dim), over the keys where key_valid) v, for q, k, v [B, S, H, D]
  and key_valid [B, S]; returns [B, S, H, D]. As jax.nn.dot_product_attention computes it: f32
  logits and softmax, the probabilities in v's dtype, and a query without any valid key
  attending to all keys alike."""
  heads_first = lambda x: x.transpose(0, 2, 1, 3)  # [B, S, H, D] <-> [B, H, S, D]
  q, k, v = heads_first(q), heads_first(k), heads_first(v)
  logits = jnp.einsum('bhtd,bhsd->bhts', q, k, preferred_element_type=jnp.float32)
  logits = jnp.where(key_valid[:, None, None, :], logits * q.shape[-1] ** -0.5,
                     -0.7 * float(jnp.finfo(jnp.float32).max))  # jax.nn's masked logit
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return heads_first(jnp.einsum('bhts,bhsd->bhtd', probs, v))


ATTENTIONS = {'jax': jax_attention, 'heads_major': heads_major_attention}


def attention_for(attention: str):
  if attention not in ATTENTIONS:
    raise ValueError(f'model.attention must be one of {list(ATTENTIONS)}, not {attention!r}')
  return ATTENTIONS[attention]


class Attention(nn.Module):
  """Multi-head self-attention; `key_valid` [B, S] keeps padding and absent modalities out."""
  heads: int
  dtype: jnp.dtype = jnp.float32
  matmul: str = 'float32'
  attention: str = 'jax'  # model.attention
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
    out = attention_for(self.attention)(q, k, v, key_valid)
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
  attention: str = 'jax'
  mesh: Any = None

  @nn.compact
  def __call__(self, x, key_valid):
    x = constrain(x, ('batch', 'length', 'embed'), self.mesh)
    dot_general = dot_general_for(self.matmul)
    x = x + Attention(self.heads, self.dtype, self.matmul, self.attention, self.mesh,
                      name='attention')(
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
  attention: str = 'jax'
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
                   attention=self.attention, mesh=self.mesh, name='blocks')(x, key_valid)
    else:
      for i in range(self.layers):
        x = block(self.heads, self.mlp_dim, self.dtype, matmul=self.matmul,
                  attention=self.attention, mesh=self.mesh, name=f'block_{i}')(x, key_valid)
    return layer_norm('ln_final', self.dtype)(x)
