"""The trainer at full depth, on the tiny config and 4 CPU devices: optimizer, GradCache
accumulation, checkpoint policy, init_from, restore onto another mesh, a non-finite loss, and a
run preempted with SIGTERM, then killed with SIGKILL, then finished, against one uninterrupted run.

One compiled program (the step of TINY below) serves most tests: the suite's persistent
compilation cache (conftest.py), shared with the subprocesses, lets each of them load it instead
of compiling it again. TINY trains two modalities, text and image (a token and a patch
objective, one contrastive pair, 2 x 2 harmonized weights): the trainer's code paths are the same
as with five, and the step compiles about 3 x faster (the five-modality step runs in
test_train_eval.py and test_model.py).
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from configs import tiny
from scale_jax import cli, sharding
from scale_jax import state as run_state
from scale_jax import train as trainer
from scale_jax.data import pipeline
from scale_jax.run_config import with_overrides

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The run every comparison uses: 12 steps on a data=2 x fsdp=2 mesh, a checkpoint every 3.
TINY = {'modalities': ('text', 'image'), 'mesh.data': 2, 'mesh.fsdp': 2, 'total_steps': 12,
        'checkpoint_every': 3, 'peak_tflops_per_device': 1.0}


def tiny_config(data_dir, **overrides):
  c = with_overrides(tiny.get_config(), {**TINY, **overrides})
  c.data.dir = data_dir
  return c


def cli_args(data_dir, **overrides):
  return ['--config', 'configs/tiny.py', f'--config.data.dir={data_dir}'] + [
      f'--config.{k}={v!r}' if isinstance(v, tuple) else f'--config.{k}={v}'
      for k, v in {**TINY, **overrides}.items()]


def read_metrics(workdir):
  """The last logged row of each training step (a resumed run logs some steps again)."""
  rows = {}
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    for line in f:
      if not line.endswith('\n'):  # being written
        continue
      row = json.loads(line)
      if 'loss' in row:
        rows[row['step']] = row
  return rows


def finalized_steps(workdir):
  directory = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(directory):
    return []
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


@pytest.fixture(scope='module')
def reference(data_dir, cache_dir, tmp_path_factory):
  """The uninterrupted run."""
  workdir = str(tmp_path_factory.mktemp('reference'))
  state = trainer.train(tiny_config(data_dir), workdir)
  return workdir, state, read_metrics(workdir)


# ------------------------------------------------------------------------------------------------
# Optimizer.

def test_schedule_warms_up_then_decays(config):
  config.optimizer.update(lr=1e-3, warmup_steps=10)
  config.total_steps = 110
  for decay, end in (('cosine', 1e-5), ('linear', 0.0)):
    config.optimizer.decay = decay
    _, schedule = run_state.make_optimizer(config)
    assert float(schedule(0)) == 0.0
    assert float(schedule(5)) == pytest.approx(5e-4)
    assert float(schedule(10)) == pytest.approx(1e-3)
    assert float(schedule(110)) == pytest.approx(end, abs=1e-9)


def test_weight_decay_mask_and_lr_multipliers(config):
  config.optimizer.update(lr=0.1, warmup_steps=0, weight_decay=0.5, clip_norm=1e9,
                          lr_multipliers=((r'^encoders_text/', 0.1), (r'^joint/', 0.0),
                                          (r'^encoders_text/', 7.0)))  # first match wins
  tx, _ = run_state.make_optimizer(config)
  layer = lambda: {'kernel': jnp.ones((2, 2)), 'bias': jnp.ones(2), 'scale': jnp.ones(2)}
  params = {'encoders_text': {'mlp_in': layer()}, 'encoders_image': {'mlp_in': layer()},
            'joint': {'mlp_in': layer()}, 'token_embed': {'embedding': jnp.ones((3, 2))}}
  # With zero gradients Adam's direction is 0, so the update is the weight decay alone:
  # -lr * multiplier * weight_decay * p on kernels, nothing on biases, norms and embeddings.
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  assert np.allclose(updates['encoders_image']['mlp_in']['kernel'], -0.1 * 0.5)
  assert np.allclose(updates['encoders_text']['mlp_in']['kernel'], -0.1 * 0.1 * 0.5)
  assert np.allclose(updates['joint']['mlp_in']['kernel'], 0.0)
  for tower in ('encoders_image', 'encoders_text'):
    assert np.allclose(updates[tower]['mlp_in']['bias'], 0.0)
    assert np.allclose(updates[tower]['mlp_in']['scale'], 0.0)
  assert np.allclose(updates['token_embed']['embedding'], 0.0)
  # With gradients: the first Adam step moves every parameter by lr * multiplier (sign of g).
  grads = jax.tree.map(jnp.ones_like, params)
  no_decay = config.copy_and_resolve_references()
  no_decay.optimizer.weight_decay = 0.0
  tx, _ = run_state.make_optimizer(no_decay)
  updates, _ = tx.update(grads, tx.init(params), params)
  assert np.allclose(updates['encoders_image']['mlp_in']['bias'], -0.1, rtol=1e-4)
  assert np.allclose(updates['encoders_text']['mlp_in']['bias'], -0.01, rtol=1e-4)
  assert np.allclose(updates['joint']['mlp_in']['bias'], 0.0)


# ------------------------------------------------------------------------------------------------
# Gradient accumulation.

def test_gradcache_accumulation_equals_the_full_batch_update(data_dir, cache_dir):
  """Two steps with the whole batch and with 2 microbatches of 4 (one row per device each).

  Step 1 runs at lr 0 (warm-up), so Adam's first moment after it is 0.1 x the clipped gradient,
  and after step 2 it holds step 2's too: these, and every metric, agree to float32 rounding.
  Step 2's parameter update agrees too, except where Adam divides a gradient at rounding level by
  its own tiny scale (a momentum that cancels between the two steps): those few coordinates move
  differently, by a fraction of the learning rate.
  """
  results = []
  for k in (1, 2):
    config = tiny_config(data_dir, microbatches=k)  # k = 1: the program `reference` runs
    mesh = sharding.make_mesh(config.mesh)
    setup = trainer.build_train_setup(config, mesh)
    step = setup.train_step.lower(setup.abstract_state, setup.abstract_batch).compile()
    state = setup.init(jax.random.key(0))
    data = iter(pipeline.train_dataset(config))
    history = []
    for _ in range(2):
      before = jax.device_get(state.params)
      state, metrics = step(state, jax.device_put(next(data), setup.batch_shardings))
      history.append((jax.device_get(state.opt_state[1][0].mu), jax.device_get(metrics)))
    update = jax.tree.map(lambda a, b: a - b, jax.device_get(state.params), before)
    results.append((history, update, float(metrics['lr'])))
  (full, full_update, lr), (accumulated, accumulated_update, _) = results
  for (mu_a, metrics_a), (mu_b, metrics_b) in zip(full, accumulated):
    for a, b in zip(jax.tree.leaves(mu_a), jax.tree.leaves(mu_b)):
      np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * np.abs(a).max())
    assert set(metrics_a) == set(metrics_b)
    for name in metrics_a:
      np.testing.assert_allclose(metrics_b[name], metrics_a[name], rtol=1e-5, atol=1e-7,
                                 err_msg=name)
  flat = lambda tree: np.concatenate([x.ravel() for x in jax.tree.leaves(tree)])
  a, b = flat(full_update), flat(accumulated_update)
  assert lr > 0 and np.median(np.abs(a)) > 0.1 * lr
  # Seen here: 99.8% of coordinates within 1e-4 x lr, the worst within 0.05 x lr.
  assert np.mean(np.abs(a - b) <= 1e-4 * lr) > 0.99
  assert np.max(np.abs(a - b)) < 0.1 * lr


def test_microbatches_keep_row_order():
  x = jnp.arange(8 * 3).reshape(8, 3)
  micro = trainer.microbatched(x, 2)
  assert micro.shape == (2, 4, 3)
  assert list(micro[0, :, 0] // 3) == [0, 2, 4, 6]
  np.testing.assert_array_equal(trainer.unmicrobatched(micro), x)


# ------------------------------------------------------------------------------------------------
# Checkpoints: keep policy, restore onto another mesh, init_from and precedence.

def test_keeps_the_latest_n_plus_every_kth(config, tmp_path):
  config.update(checkpoint_keep=2, checkpoint_keep_every=4)
  manager = run_state.checkpoint_manager(str(tmp_path), config)
  for step in range(1, 11):
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave({'x': np.ones(2)})))
  manager.wait_until_finished()
  manager.close()
  assert finalized_steps(str(tmp_path)) == [4, 8, 9, 10]


@pytest.mark.parametrize('mesh', [dict(data=4, fsdp=1, tensor=1), dict(data=1, fsdp=2, tensor=2)])
def test_checkpoint_restores_onto_another_mesh(reference, data_dir, mesh):
  workdir, final, _ = reference  # saved on data=2 x fsdp=2
  config = tiny_config(data_dir, **{f'mesh.{k}': v for k, v in mesh.items()})
  new_mesh = sharding.make_mesh(config.mesh)
  setup = trainer.build_train_setup(config, new_mesh)
  manager = run_state.checkpoint_manager(workdir, config)
  state = manager.restore(12, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(setup.abstract_state))).state
  manager.close()
  kernel = state.params['joint']['block_0']['mlp_in']['kernel']  # (embed, mlp)
  assert kernel.sharding.mesh.shape == new_mesh.shape
  assert kernel.sharding.spec == setup.state_shardings.params['joint']['block_0']['mlp_in'][
      'kernel'].spec
  for a, b in zip(jax.tree.leaves(final), jax.tree.leaves(state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_init_from_copies_only_the_selected_tower(reference, data_dir, tmp_path, capsys):
  source, final, _ = reference
  config = tiny_config(data_dir, seed=1, total_steps=0)
  config.init_from.update(workdir=source, include=r'^encoders_text/')
  state = trainer.train(config, str(tmp_path))
  assert 'initialised 14 of' in capsys.readouterr().out  # one encoder block and final norm
  setup = trainer.build_train_setup(config, sharding.make_mesh(config.mesh))
  fresh = setup.init(jax.random.key(1))
  for name in state.params:
    expected = final.params[name] if name == 'encoders_text' else fresh.params[name]
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(state.params[name])):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)
  assert int(state.step) == 0
  with pytest.raises(ValueError, match='selects no parameter'):
    config.init_from.include = '^no_such_tower/'
    trainer.train(config, str(tmp_path / 'other'))


def test_resume_takes_precedence_over_init_from(reference, data_dir, tmp_path, capsys):
  source, final, _ = reference
  workdir = str(tmp_path / 'run')
  shutil.copytree(source, workdir)
  config = tiny_config(data_dir, seed=1)
  config.init_from.update(workdir=str(tmp_path / 'does-not-exist'))
  config.optimizer.warmup_steps = 12  # (the schedule is not stored: the checkpoint still fits)
  saved = (tmp_path / 'run' / 'config.json').read_text()
  state = trainer.train(config, workdir)  # already at total_steps: restores, runs nothing
  assert (tmp_path / 'run' / 'config.json').read_text() == saved  # the config that trained it
  out = capsys.readouterr().out
  assert 'resumed from step 12' in out
  assert f'nothing to train: {workdir} is at step 12 and config.total_steps is 12' in out
  assert 'warning: config.optimizer.warmup_steps=12 is not below config.total_steps=12' in out
  for a, b in zip(jax.tree.leaves(final.params), jax.tree.leaves(state.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ------------------------------------------------------------------------------------------------
# Metrics.

def test_metrics_of_every_step(reference):
  _, _, rows = reference
  assert sorted(rows) == list(range(1, 13))
  modalities = TINY['modalities']
  for row in rows.values():
    for key in ('loss', 'contrastive', 'grad_norm', 'lr', 'step_time', 'examples_per_sec',
                'data_wait', 'tflops_per_sec', 'model_tflops_per_sec', 'mfu', 'mlm', 'mrm'):
      assert np.isfinite(row[key]), key
    for a in modalities:
      for b in modalities:
        assert 0.0 <= row[f'weights/{a}-{b}'] <= 1.0
  # peak_tflops_per_device=1 over 4 devices: MFU is model TFLOP/s / 4.
  row = rows[12]
  assert row['mfu'] == pytest.approx(row['model_tflops_per_sec'] / 4)


def test_measured_peak_counts_a_process_cpu_cores_once():
  cpus = jax.devices()  # the suite's 4 CPU devices, one process: the same two cores
  assert len(cpus) == 4 and cpus[0].platform == 'cpu'
  assert trainer.peak_of_devices(0.2, cpus) == pytest.approx(0.2)
  hosts = [types.SimpleNamespace(platform='cpu', process_index=i // 2) for i in range(4)]
  assert trainer.peak_of_devices(0.2, hosts) == pytest.approx(0.4)  # two processes' cores
  chips = [types.SimpleNamespace(platform='tpu', process_index=0)] * 8
  assert trainer.peak_of_devices(197.0, chips) == pytest.approx(8 * 197.0)


def test_mfu_peak_is_in_the_dtype_the_matmuls_run_in():
  config = ml_collections.ConfigDict({'model': {'dtype': 'float32', 'matmul': 'float32'}})
  assert trainer.matmul_dtype(config) == 'float32'
  config.model.matmul = 'bf16_operands'  # f32 compute, bf16 matmuls: the bf16 peak
  assert trainer.matmul_dtype(config) == 'bfloat16'
  config.model.update(dtype='bfloat16', matmul='float32')
  assert trainer.matmul_dtype(config) == 'bfloat16'


def test_a_cpu_run_is_told_of_huge_pages_only_where_they_would_help(monkeypatch, tmp_path):
  thp = tmp_path / 'enabled'  # the kernel's transparent-huge-page mode
  monkeypatch.setattr(trainer, 'TRANSPARENT_HUGEPAGE', str(thp))
  for name in ('LD_PRELOAD', 'GLIBC_TUNABLES'):
    monkeypatch.delenv(name, raising=False)
  thp.write_text('always [madvise] never\n')
  assert 'GLIBC_TUNABLES=glibc.malloc.hugetlb=1' in trainer.cpu_allocator_tip()
  monkeypatch.setenv('GLIBC_TUNABLES', 'glibc.malloc.hugetlb=1')
  assert trainer.cpu_allocator_tip() is None  # asked for already
  monkeypatch.setenv('GLIBC_TUNABLES', 'glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0')
  assert trainer.cpu_allocator_tip() is None  # glibc tuned another way
  monkeypatch.delenv('GLIBC_TUNABLES')
  monkeypatch.setenv('LD_PRELOAD', '/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4')
  assert trainer.cpu_allocator_tip() is None  # a caching malloc
  monkeypatch.delenv('LD_PRELOAD')
  for mode in ('[always] madvise never', 'always madvise [never]'):
    thp.write_text(mode)  # huge pages unasked, or none to be had
    assert trainer.cpu_allocator_tip() is None
  thp.unlink()  # a kernel without transparent huge pages
  assert trainer.cpu_allocator_tip() is None


# ------------------------------------------------------------------------------------------------
# A non-finite loss.

def test_nonfinite_loss_stops_the_run_and_keeps_the_last_checkpoint(data_dir, cache_dir, tmp_path,
                                                                    monkeypatch):
  """NaN in the image input at masked patches of one batch: the forward pass never sees it (the
  model swaps masked patches for a learned token) but MRM's target does, so MRM is the first
  non-finite metric."""
  config = tiny_config(data_dir)
  image = list(config.modalities).index('image')
  masked_image = lambda b: b['image_masked'] & b['present'][:, image, None]
  # The first batch from step 5 on with a masked image patch gets the NaN.
  probe, bad_step = iter(pipeline.train_dataset(config)), None
  for step in range(1, 12):
    batch = next(probe)
    if step >= 5 and masked_image(batch).any():
      bad_step = step
      break
  assert bad_step is not None
  original = pipeline.train_dataset

  def poisoned(*args, **kwargs):
    count = [0]

    def inject(batch):
      count[0] += 1
      if count[0] == bad_step:
        batch = dict(batch)
        batch['image_input'] = np.where(masked_image(batch)[..., None], np.nan,
                                        batch['image_input'])
      return batch
    return original(*args, **kwargs).map(inject)

  monkeypatch.setattr(pipeline, 'train_dataset', poisoned)
  workdir = str(tmp_path)
  with pytest.raises(FloatingPointError, match=f'mrm is not finite at step {bad_step}'):
    trainer.train(config, workdir)
  good = max(s for s in range(3, bad_step, 3))
  assert finalized_steps(workdir) == [s for s in (good - 3, good) if s > 0][-2:]
  assert max(read_metrics(workdir)) == bad_step - 1  # the bad step's metrics are not written
  setup = trainer.build_train_setup(config, sharding.make_mesh(config.mesh))
  manager = run_state.checkpoint_manager(workdir, config)
  state = manager.restore(good, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(setup.abstract_state))).state
  manager.close()
  assert int(state.step) == good and int(state.nonfinite_step) == -1
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state))


# ------------------------------------------------------------------------------------------------
# Preemption, a kill, and exact resume.

def launch(data_dir, workdir, cache_dir):
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=cache_dir)
  return subprocess.Popen(
      [sys.executable, '-m', 'scale_jax.train', '--workdir', workdir] + cli_args(data_dir),
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(proc, condition, what, timeout=300):
  deadline = time.time() + timeout
  while not condition():
    if proc.poll() is not None:
      pytest.fail(f'the run ended (rc {proc.returncode}) before {what}:\n{proc.stdout.read()}')
    if time.time() > deadline:
      proc.kill()
      pytest.fail(f'timed out waiting for {what}')
    time.sleep(0.02)


def logged_steps(workdir):
  path = os.path.join(workdir, 'metrics.jsonl')
  return read_metrics(workdir) if os.path.exists(path) else {}


def test_sigterm_then_sigkill_then_resume_matches_the_uninterrupted_run(reference, data_dir,
                                                                        cache_dir, tmp_path):
  _, _, expected = reference
  workdir = str(tmp_path)
  # 1. SIGTERM once step 2 is logged: saves at the current step and exits 0.
  proc = launch(data_dir, workdir, cache_dir)
  wait_for(proc, lambda: max(logged_steps(workdir), default=0) >= 2, 'step 2')
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, out
  preempted = max(logged_steps(workdir))
  assert f'preempted (SIGTERM): saved step {preempted}' in out
  assert finalized_steps(workdir)[-1] == preempted
  # 2. Resume, then SIGKILL once a later checkpoint is complete and the run is past it.
  proc = launch(data_dir, workdir, cache_dir)
  later = lambda: [s for s in finalized_steps(workdir) if s > preempted]
  wait_for(proc, lambda: later() and max(logged_steps(workdir)) > later()[0],
           'a checkpoint after the resume')
  proc.kill()
  out, _ = proc.communicate()
  assert f'resumed from step {preempted}' in out
  killed_after = max(s for s in finalized_steps(workdir))
  # 3. Resume to the end.
  proc = launch(data_dir, workdir, cache_dir)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out
  assert f'resumed from step {killed_after}' in out
  rows = read_metrics(workdir)
  assert sorted(rows) == list(range(1, 13))
  for step, row in rows.items():
    for name in ('loss', 'contrastive', 'grad_norm', 'mlm', 'mrm'):
      assert abs(row[name] - expected[step][name]) <= 1e-6, (step, name)


def test_distributed_args_from_flags_or_environment():
  assert cli.distributed_args(False, None, None, None) is None
  assert cli.distributed_args(True, None, None, None) == dict(
      coordinator_address=None, num_processes=None, process_id=None)
  assert cli.distributed_args(False, 'localhost:1234', 2, 0) == dict(
      coordinator_address='localhost:1234', num_processes=2, process_id=0)


def test_errors_of_our_own_checks_are_one_line_others_keep_their_traceback(raw_dir, tmp_path):
  """`data.dir` at a raw catalogue: the command says what to run, without a traceback."""
  run = subprocess.run(
      [sys.executable, '-m', 'scale_jax.train', '--config', 'configs/tiny.py', '--workdir',
       str(tmp_path / 'run'), f'--config.data.dir={raw_dir}'],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert run.returncode == 1 and 'Traceback' not in run.stderr
  assert (f'error: {raw_dir}: a raw catalogue, not a built dataset; build one with `python -m '
          f'scale_jax.data.build --raw {raw_dir} --out DATA`') in run.stderr
  typo = subprocess.run(
      [sys.executable, '-m', 'scale_jax.train', '--config', 'configs/tiny.py', '--workdir',
       str(tmp_path / 'run'), '--config.model.widht=8'],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert typo.returncode == 1 and 'Traceback' not in typo.stderr
  assert ("error: --config.model.widht: the config has no field 'model.widht'. Did you mean "
          '"width" instead of "widht"?') in typo.stderr
  with pytest.raises(FileNotFoundError) as ours:
    pipeline.open_split(str(tmp_path), 'train')  # raised by our check
  with pytest.raises(ValueError) as numpy_error:
    np.zeros(3).reshape(2)  # a library's error: a bug to find, traceback kept
  assert cli.raised_for_the_user(ours.value) and not cli.raised_for_the_user(numpy_error.value)
