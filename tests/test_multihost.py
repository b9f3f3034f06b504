"""Two processes on localhost, 2 CPU devices each, joined by jax.distributed over gloo (through
launch/localhost_multiprocess.sh), against one process with 4 devices: the same mesh
(data=2 x fsdp=2, so parameters are sharded across the processes), the same global batches (the
pipeline hands process p rows [p B/2, (p+1) B/2) of each), so the same losses up to the order of
floating-point sums in the cross-process collectives, and the same evaluation. The two-process
run is preempted (SIGTERM) part way and restarted, so both processes agree on the step to save at
and restore their own shards and iterator states."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from jax.experimental.compilation_cache import compilation_cache

from configs import tiny
from scale_jax import train as trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Two modalities compile ~3 x faster than five; the multi-process code paths are the same.
RUN = {'modalities': ('text', 'image'), 'mesh.data': 2, 'mesh.fsdp': 2, 'total_steps': 12,
       'checkpoint_every': 3,
       'peak_tflops_per_device': 1.0, 'preemption_check_every': 2,
       # Evaluation on the validation split at the last step: features of every process's rows.
       'eval.combinations': ('text', 'text+image'), 'evals.coarse.every': 12,
       'evals.fine.every': 12, 'evals.probe.every': 12, 'evals.clustering.every': 12}


def free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def rows_of(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    rows = [json.loads(line) for line in f if line.endswith('\n')]  # a line being written: not yet
  train = {r['step']: r for r in rows if 'loss' in r}
  evals = [r for r in rows if any(k.startswith('eval/') for k in r)]
  return train, evals


@pytest.fixture(scope='module')
def cache_dir(tmp_path_factory):
  path = str(tmp_path_factory.getbasetemp() / 'jax-compilation-cache')  # test_trainer's too
  compilation_cache.set_cache_dir(path)
  compilation_cache.reset_cache()
  yield path
  jax.config.update('jax_compilation_cache_dir', None)
  compilation_cache.reset_cache()


def test_two_processes_match_one_with_four_devices(data_dir, cache_dir, tmp_path):
  config = tiny.get_config()
  config.data.dir = data_dir
  for key, value in RUN.items():
    *sections, leaf = key.split('.')
    node = config
    for section in sections:
      node = node[section]
    node[leaf] = value
  one = str(tmp_path / 'one')
  trainer.train(config, one)

  two = str(tmp_path / 'two')
  env = dict(os.environ, PYTHON=sys.executable, PORT=str(free_port()),
             JAX_COMPILATION_CACHE_DIR=cache_dir)
  command = (['bash', 'launch/localhost_multiprocess.sh', '2', 'configs/tiny.py', two]
             + [f'--config.data.dir={data_dir}']
             + [f'--config.{k}={v!r}' if isinstance(v, tuple) else f'--config.{k}={v}'
                for k, v in RUN.items()])
  launch = lambda: subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True)
  # Preempted once step 2 is logged: every process saves at the same step and exits 0.
  proc, deadline = launch(), time.time() + 400
  metrics = os.path.join(two, 'metrics.jsonl')
  while not (os.path.exists(metrics) and max(rows_of(two)[0], default=0) >= 2):
    assert proc.poll() is None, proc.stdout.read()[-5000:]
    assert time.time() < deadline, 'timed out'
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out[-5000:]
  saved = max(rows_of(two)[0])
  assert f'preempted (SIGTERM): saved step {saved}' in out and saved % 2 == 0 and saved < 12
  # Restarted: resumes there and finishes.
  proc = launch()
  out, _ = proc.communicate(timeout=400)
  assert proc.returncode == 0, out[-5000:]
  assert f'resumed from step {saved}' in out

  expected, expected_eval = rows_of(one)
  got, got_eval = rows_of(two)
  assert sorted(got) == list(range(1, 13))
  # Sums over devices in another order: a few float32 ulps per step, grown over 12 Adam steps.
  for step, row in got.items():
    for name in ('loss', 'contrastive', 'grad_norm', 'mlm', 'mrm'):
      np.testing.assert_allclose(row[name], expected[step][name], rtol=1e-5,
                                 err_msg=f'{name} at step {step}')
  # Evaluation: every process extracted features for its rows and gathered them.
  assert len(got_eval) == len(expected_eval) == 1
  assert 'eval/fine/text+image/mAP@1' in got_eval[0] and 'eval/clustering/text/NMI' in got_eval[0]
  for k, v in expected_eval[0].items():
    assert got_eval[0][k] == pytest.approx(v, abs=1e-6), k
  # One Grain iterator state per process in each checkpoint.
  data_item = os.path.join(two, 'checkpoints', '12', 'data')
  assert len([f for f in os.listdir(data_item) if 'process' in f]) == 2, os.listdir(data_item)
