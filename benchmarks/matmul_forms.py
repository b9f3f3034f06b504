r"""Which forms of a dense layer's three matmuls hit XLA:CPU's bf16 kernel: GFLOP/s per form at
clip_peer's and the paper's MLP shapes, and a whole dense forward + backward in f32, in a naive
bf16 custom VJP and in model.matmul='bf16_operands' (docs/benchmarks.md has the table).

    python benchmarks/matmul_forms.py

Each row: `| shape | matmul | form | ms | GFLOP/s |`, the best of 7 runs of the jitted dot alone
(or of jax.grad of 0.5 * sum(y**2) for a whole dense: three matmuls' FLOPs over its time).
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from scale_jax.model.layers import _bf16_matmul, _row_major_transpose

BF16, F32 = jnp.bfloat16, jnp.float32
SHAPES = {  # name: (M, K, N) of y [M, N] = x [M, K] W [K, N]
    'clip image mlp_in': (8320, 256, 1024),
    'clip image mlp_out': (8320, 1024, 256),
    'paper joint mlp_in': (3696, 768, 3072),
    'paper joint mlp_out': (3696, 3072, 768),
}


def dot(a, b, contract_a, contract_b, out=F32):
  """A 2-D dot_general contracting a's axis `contract_a` with b's `contract_b`."""
  return lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((), ())),
                         preferred_element_type=out)


def best_seconds(f, *args, reps=7):
  compiled = jax.jit(f).lower(*args).compile()
  jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - t)
  return min(times)


@jax.custom_vjp
def naive_bf16_matmul(x, w):
  """bf16 operands with dW as autodiff writes it (x contracted on its first axis)."""
  return dot(x.astype(BF16), w.astype(BF16), 1, 0)


def _naive_fwd(x, w):
  xb, wb = x.astype(BF16), w.astype(BF16)
  return dot(xb, wb, 1, 0), (xb, wb)


def _naive_bwd(res, dy):
  xb, wb = res
  dyb = dy.astype(BF16)
  return dot(dyb, wb, 1, 1), dot(xb, dyb, 0, 0)


naive_bf16_matmul.defvjp(_naive_fwd, _naive_bwd)


def dot_forms(x, w, dy):
  """(matmul, form, function, operands) for each form of the forward, dx and dW."""
  xb, wb, dyb = x.astype(BF16), w.astype(BF16), dy.astype(BF16)
  return [
      ('fwd y=xW', 'f32 (1,0)', lambda a, b: dot(a, b, 1, 0), x, w),
      ('fwd y=xW', 'bf16 (1,0)', lambda a, b: dot(a, b, 1, 0), xb, wb),
      ('fwd y=xW', 'bf16 (1,0), preferred bf16', lambda a, b: dot(a, b, 1, 0, BF16), xb, wb),
      ('dx=dy W^T', 'f32 (1,1)', lambda a, b: dot(a, b, 1, 1), dy, w),
      ('dx=dy W^T', 'bf16 (1,1)', lambda a, b: dot(a, b, 1, 1), dyb, wb),
      ('dx=dy W^T', 'bf16 jnp.transpose(W) then (1,0)',
       lambda a, b: dot(a, jnp.transpose(b), 1, 0), dyb, wb),
      ('dW=x^T dy', 'f32 (0,0)', lambda a, b: dot(a, b, 0, 0), x, dy),
      ('dW=x^T dy', 'bf16 (0,0)', lambda a, b: dot(a, b, 0, 0), xb, dyb),
      ('dW=x^T dy', 'bf16 jnp.transpose(x) then (1,0)',
       lambda a, b: dot(jnp.transpose(a), b, 1, 0), xb, dyb),
      ('dW=x^T dy', 'bf16 row-major x^T copy (barrier) (1,0)',
       lambda a, b: dot(_row_major_transpose(a), b, 1, 0), xb, dyb),
      ('dW=x^T dy', 'bf16, x^T passed in as input (1,0)', lambda a, b: dot(a, b, 1, 0),
       xb.T.copy(), dyb),
  ]


DENSES = (('f32', lambda a, b: a @ b), ('bf16 custom VJP, dW (0,0)', naive_bf16_matmul),
          ('bf16 model.matmul=bf16_operands', _bf16_matmul))


def main():
  rng = np.random.default_rng(0)
  print(os.popen('uptime').read().strip())
  for name, (m, k, n) in SHAPES.items():
    x = jnp.asarray(rng.normal(size=(m, k)), F32)
    w = jnp.asarray(rng.normal(size=(k, n)) / np.sqrt(k), F32)
    dy = jnp.asarray(rng.normal(size=(m, n)), F32)
    gflop = 2 * m * k * n / 1e9
    print(f'== {name} {m}x{k}x{n}: {gflop:.2f} GFLOP per matmul', flush=True)
    for what, form, f, a, b in dot_forms(x, w, dy):
      t = best_seconds(f, a, b)
      print(f'| {name} | {what} | {form} | {t * 1e3:.1f} | {gflop / t:.0f} |', flush=True)
    for _ in range(2):  # twice: the machine's load drifts
      for label, matmul in DENSES:
        grad = jax.grad(lambda x, w, mm=matmul: 0.5 * jnp.sum(jnp.square(mm(x, w))),
                        argnums=(0, 1))
        t = best_seconds(grad, x, w)
        print(f'| {name} | dense fwd+bwd | {label} | {t * 1e3:.1f} | {3 * gflop / t:.0f} |',
              flush=True)
  print(os.popen('uptime').read().strip())


if __name__ == '__main__':
  main()
