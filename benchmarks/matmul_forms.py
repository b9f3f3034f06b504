r"""Which forms of a dense layer's three matmuls hit XLA:CPU's bf16 kernel: GFLOP/s per form at
clip_peer's and the paper's MLP shapes, and a whole dense forward + backward in f32, in a naive
bf16 custom VJP and in model.matmul='bf16_operands' (docs/benchmarks.md has the table).

    python benchmarks/matmul_forms.py
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top,wrong-import-position
import jax, jax.numpy as jnp, numpy as np
from jax import lax
from scale_jax.model.layers import _bf16_matmul, _row_major_transpose as ob_t
bf, f32 = jnp.bfloat16, jnp.float32
def dg(a, b, ca, cb): return lax.dot_general(a, b, ((ca, cb), ((), ())), preferred_element_type=f32)
def bench(f, *args, reps=7):
  c = jax.jit(f).lower(*args).compile(); jax.block_until_ready(c(*args)); ts = []
  for _ in range(reps):
    t = time.perf_counter(); jax.block_until_ready(c(*args)); ts.append(time.perf_counter() - t)
  return min(ts)
@jax.custom_vjp
def naive(x, w): return dg(x.astype(bf), w.astype(bf), (1,), (0,))
def nf(x, w):
  xb, wb = x.astype(bf), w.astype(bf); return dg(xb, wb, (1,), (0,)), (xb, wb)
def nb(r, dy):
  xb, wb = r; d = dy.astype(bf); return dg(d, wb, (1,), (1,)), dg(xb, d, (0,), (0,))
naive.defvjp(nf, nb)
shapes = {'clip image mlp_in 8320x256x1024': (8320, 256, 1024), 'clip image mlp_out 8320x1024x256': (8320, 1024, 256),
          'paper joint mlp_in 3696x768x3072': (3696, 768, 3072), 'paper joint mlp_out 3696x3072x768': (3696, 3072, 768)}
rng = np.random.default_rng(0)
print(os.popen('uptime').read().strip())
for name, (M, K, N) in shapes.items():
  x = jnp.asarray(rng.normal(size=(M, K)), f32); w = jnp.asarray(rng.normal(size=(K, N)) / np.sqrt(K), f32)
  dy = jnp.asarray(rng.normal(size=(M, N)), f32); xb, wb, dyb = x.astype(bf), w.astype(bf), dy.astype(bf)
  g = 2 * M * K * N / 1e9
  rows = [
   ('fwd y=xW', 'f32 (1,0)', lambda a, b: dg(a, b, (1,), (0,)), x, w),
   ('fwd y=xW', 'bf16 (1,0)', lambda a, b: dg(a, b, (1,), (0,)), xb, wb),
   ('fwd y=xW', 'bf16 (1,0), preferred bf16', lambda a, b: lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=bf), xb, wb),
   ('dx=dy W^T', 'f32 (1,1)', lambda a, b: dg(a, b, (1,), (1,)), dy, w),
   ('dx=dy W^T', 'bf16 (1,1)', lambda a, b: dg(a, b, (1,), (1,)), dyb, wb),
   ('dx=dy W^T', 'bf16 jnp.transpose(W) then (1,0)', lambda a, b: dg(a, jnp.transpose(b), (1,), (0,)), dyb, wb),
   ('dW=x^T dy', 'f32 (0,0)', lambda a, b: dg(a, b, (0,), (0,)), x, dy),
   ('dW=x^T dy', 'bf16 (0,0)', lambda a, b: dg(a, b, (0,), (0,)), xb, dyb),
   ('dW=x^T dy', 'bf16 jnp.transpose(x) then (1,0)', lambda a, b: dg(jnp.transpose(a), b, (1,), (0,)), xb, dyb),
   ('dW=x^T dy', 'bf16 row-major x^T copy (barrier) (1,0)', lambda a, b: dg(ob_t(a), b, (1,), (0,)), xb, dyb),
   ('dW=x^T dy', 'bf16, x^T passed in as input (1,0)', lambda a, b: dg(a, b, (1,), (0,)), xb.T.copy(), dyb),
  ]
  print(f'== {name}: {g:.2f} GFLOP per matmul', flush=True)
  for what, form, f, a, b in rows:
    t = bench(f, a, b); print(f'| {name.split(" 8")[0].split(" 3")[0]} | {what} | {form} | {t*1e3:.1f} | {g/t:.0f} |', flush=True)
  loss = lambda mm: (lambda x, w: 0.5 * jnp.sum(jnp.square(mm(x, w))))
  for _ in range(2):
    for label, mm in [('f32', lambda a, b: a @ b), ('bf16 custom VJP, dW (0,0)', naive), ('bf16 model.matmul=bf16_operands', _bf16_matmul)]:
      t = bench(jax.grad(loss(mm), argnums=(0, 1)), x, w)
      print(f'| {name.split(" 8")[0].split(" 3")[0]} | dense fwd+bwd | {label} | {t*1e3:.1f} | {3*g/t:.0f} |', flush=True)
print(os.popen('uptime').read().strip())
