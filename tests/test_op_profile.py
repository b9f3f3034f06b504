"""benchmarks/op_profile.py: the wall-time shares of overlapping ops, the HLO reading, the groups,
and a profile of a small two-tower step."""
import jax
import jax.numpy as jnp
import pytest

from benchmarks import op_profile
from configs import clip_peer


def test_overlapping_ops_share_the_wall_time():
  # a runs 0-10 ms, b 5-15 ms: 5 ms alone each, 5 ms together (2.5 each); idle 15-20 ms.
  ms = 1_000_000
  shares, busy = op_profile.wall_shares(
      [(0, 10 * ms, 'a'), (5 * ms, 15 * ms, 'b'), (20 * ms, 20 * ms, 'c')])
  assert shares['a'] == pytest.approx(7.5) and shares['b'] == pytest.approx(7.5)
  assert busy == pytest.approx(15.0)


def test_hlo_gives_each_dot_its_flops():
  compiled = jax.jit(lambda a, b: jnp.tanh(a @ b)).lower(
      jnp.ones((64, 32)), jnp.ones((32, 48))).compile()
  hlo = op_profile.Hlo(compiled.as_text())
  dots = [n for n, i in hlo.instructions.items() if i['opcode'] == 'dot']
  assert [hlo.dot_flops(d) for d in dots] == [2 * 64 * 32 * 48]
  assert hlo.dot_shape(dots[0]) == '[64, 32] x [32, 48]'


@pytest.mark.parametrize('op_name, has_dot, moves_only, kernel_grad, group', [
    ('jit(train_step)/jvp(Scale)/encoders_image/block_0/mlp_in/dot_general', True, False, False,
     'matmul forward'),
    ('jit(train_step)/transpose(jvp(Scale))/encoders_text/block_3/attention/qkv/dot_general',
     True, False, False, 'matmul backward dx'),
    ('jit(train_step)/transpose(jvp(Scale))/encoders_text/block_3/mlp_out/transpose', True,
     False, True, 'matmul backward dW'),
    ('jit(train_step)/jvp(Scale)/encoders_image/block_0/attention/vmap(BTNH,BSNH->BNTS)/'
     'dot_general', True, False, False, 'attention core'),
    ('jit(train_step)/jvp(Scale)/encoders_image/block_0/attention/vmap()/reduce_max', False,
     False, False, 'attention core'),
    ('jit(train_step)/transpose(jvp(Scale))/encoders_image/block_0/mlp_in/transpose', False,
     True, False, 'layout copies'),
    ('jit(train_step)/jvp(Scale)/encoders_text/block_1/ln_mlp/reduce_sum', False, False, False,
     'LayerNorm'),
    ('jit(train_step)/jvp(Scale)/encoders_text/block_1/tanh', False, False, False,
     'GELU and residual'),
    ('jit(train_step)/jit(_where)/select_n', False, False, False, 'optimizer and update'),
    ('jit(train_step)/jvp(Scale)/Scale.embed/concatenate', False, False, False, 'the rest'),
])
def test_ops_fall_into_their_groups(op_name, has_dot, moves_only, kernel_grad, group):
  assert op_profile.classify(op_name, has_dot, moves_only, kernel_grad) == group


@pytest.mark.parametrize('features,copies', [(96, [[64, 256]]),  # x^T
                                              (32, [[32, 256], [64, 32]])])  # dy^T, dW
def test_a_fused_transpose_copy_is_a_layout_copy(features, copies):
  # bf16_operands' dW = x^T dy (or (dy^T x)^T): each row-major copy is a fusion of its own.
  from scale_jax.model.layers import _bf16_matmul  # pylint: disable=import-outside-toplevel
  grad = jax.grad(lambda x, w: jnp.tanh(_bf16_matmul(x, w)).sum(), argnums=(0, 1))
  compiled = jax.jit(grad).lower(jnp.ones((256, 64)), jnp.ones((64, features))).compile()
  hlo = op_profile.Hlo(compiled.as_text())
  fusions = [n for n, i in hlo.instructions.items() if i['opcode'] == 'fusion']
  assert sorted(hlo.instructions[n]['dims'] for n in fusions if hlo.moves_only(n)) == copies, (
      compiled.as_text())
  tanh = [n for n in fusions if 'tanh' in {hlo.instructions[m]['opcode'] for m in hlo.inner(n)}]
  assert tanh and not any(hlo.moves_only(n) for n in tanh)


def test_a_fusion_without_an_op_name_is_named_after_what_it_runs():
  # Under jax.checkpoint XLA computes sin(x) again inside the x^T copy's fusion, whose root (the
  # copy) carries no op_name: it is named after what it runs, not left to look like the optimizer.
  from scale_jax.model.layers import _bf16_matmul  # pylint: disable=import-outside-toplevel
  f = jax.checkpoint(lambda x, w: jnp.tanh(_bf16_matmul(jnp.sin(x), w)).sum(),
                     policy=jax.checkpoint_policies.dots_saveable)
  compiled = jax.jit(jax.grad(f, argnums=(0, 1))).lower(
      jnp.ones((256, 64)), jnp.ones((64, 96))).compile()
  hlo = op_profile.Hlo(compiled.as_text())
  fused_copies = [n for n, i in hlo.instructions.items() if i['opcode'] == 'fusion' and
                  {'sine', 'transpose'} <= {hlo.instructions[m]['opcode'] for m in hlo.inner(n)}]
  assert fused_copies, compiled.as_text()
  for n in fused_copies:
    assert 'jvp(' in hlo.instructions[n]['op_name'], hlo.instructions[n]
    assert op_profile.classify(hlo.instructions[n]['op_name'], False, hlo.moves_only(n),
                               False) != 'optimizer and update'


def test_profile_of_a_small_clip_step():
  config = clip_peer.get_config()
  config.batch_size = 8
  config.text.max_len = 8
  config.image.update(size=16, patch=8)
  config.model.update(vocab_size=64, width=32, heads=2, mlp_dim=64, encoder_layers=1,
                      embed_dim=16)
  result = op_profile.profile_ours(config, steps=2)
  groups = result['groups']
  assert groups['matmul forward'] > 0 and groups['matmul backward dx'] > 0
  assert groups['matmul backward dW'] > 0
  assert sum(groups.values()) == pytest.approx(result['busy_ms'])
  assert result['busy_ms'] <= result['wall_ms']
  assert set(groups) <= set(op_profile.GROUPS)


def test_a_scanned_stack_counts_one_layers_kernels():
  stack = {'blocks': {'mlp_in': {'kernel': jnp.ones((6, 32, 64)), 'bias': jnp.ones((6, 64))}},
           'head': {'kernel': jnp.ones((32, 16)), 'bias': jnp.ones((16,))}}
  assert op_profile.layer_kernel_sizes(stack) == {32 * 64, 32 * 16}
