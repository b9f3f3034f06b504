"""Processes on localhost joined by jax.distributed over gloo (launch/localhost_multiprocess.sh),
sharing 4 CPU devices, against one uninterrupted process with 4 devices: the same mesh
(data=2 x fsdp=2, so with two processes parameters are sharded across them), the same global
batches (the pipeline hands process p rows [p B/P, (p+1) B/P) of each), so the same losses up to
the order of floating-point sums in the cross-process collectives, and the same evaluation. Each
run is preempted (SIGTERM) part way, so all processes agree on the step to save at, and resumed
on another number of processes (2 -> 1 and 1 -> 2): the input position follows from the step."""
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

from configs import tiny
from scale_jax import train as trainer
from scale_jax.run_config import with_overrides

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


def run_config(data_dir):
  config = with_overrides(tiny.get_config(), RUN)
  config.data.dir = data_dir
  return config


@pytest.fixture(scope='module')
def reference(data_dir, cache_dir, tmp_path_factory):
  """One process with 4 devices, uninterrupted: (train rows by step, evaluation rows, workdir)."""
  one = str(tmp_path_factory.mktemp('one'))
  trainer.train(run_config(data_dir), one)
  return (*rows_of(one), one)


def launch(processes, workdir, data_dir, cache_dir, port):
  """launch/localhost_multiprocess.sh with `processes` processes sharing 4 CPU devices."""
  env = dict(os.environ, PYTHON=sys.executable, PORT=str(port), DEVICES=str(4 // processes),
             JAX_COMPILATION_CACHE_DIR=cache_dir)
  command = (['bash', 'launch/localhost_multiprocess.sh', str(processes), 'configs/tiny.py',
              workdir, f'--config.data.dir={data_dir}']
             + [f'--config.{k}={v!r}' if isinstance(v, tuple) else f'--config.{k}={v}'
                for k, v in RUN.items()])
  return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def preempt_then_resume(before, after, workdir, data_dir, cache_dir):
  """Runs on `before` processes until step 2 is logged, preempts them (SIGTERM: every process
  saves at the same step and exits 0), then finishes the run on `after` processes."""
  port = free_port()
  proc, deadline = launch(before, workdir, data_dir, cache_dir, port), time.time() + 400
  metrics = os.path.join(workdir, 'metrics.jsonl')
  while not (os.path.exists(metrics) and max(rows_of(workdir)[0], default=0) >= 2):
    assert proc.poll() is None, proc.stdout.read()[-5000:]
    assert time.time() < deadline, 'timed out'
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out[-5000:]
  saved = max(rows_of(workdir)[0])
  assert f'preempted (SIGTERM): saved step {saved}' in out and saved < 12
  if before > 1:  # the processes agree on their flags every preemption_check_every (2) steps
    assert saved % 2 == 0
  proc = launch(after, workdir, data_dir, cache_dir, free_port())
  out, _ = proc.communicate(timeout=400)
  assert proc.returncode == 0, out[-5000:]
  assert f'resumed from step {saved}' in out
  return rows_of(workdir)


def assert_same_losses(got, expected):
  assert sorted(got) == list(range(1, 13))
  # Sums over devices in another order: a few float32 ulps per step, grown over 12 Adam steps.
  for step, row in got.items():
    for name in ('loss', 'contrastive', 'grad_norm', 'mlm', 'mrm'):
      np.testing.assert_allclose(row[name], expected[step][name], rtol=1e-5,
                                 err_msg=f'{name} at step {step}')


def test_two_processes_resumed_by_one_match_one_uninterrupted(reference, data_dir, cache_dir,
                                                               tmp_path):
  got, _ = preempt_then_resume(2, 1, str(tmp_path / 'run'), data_dir, cache_dir)
  assert_same_losses(got, reference[0])


def test_one_process_resumed_by_two_matches_and_evaluates_alike(reference, data_dir, cache_dir,
                                                                 tmp_path):
  got, got_eval = preempt_then_resume(1, 2, str(tmp_path / 'run'), data_dir, cache_dir)
  assert_same_losses(got, reference[0])
  # Evaluation at step 12 on two processes: each extracted features for its rows and gathered.
  expected_eval = reference[1]
  assert len(got_eval) == len(expected_eval) == 1
  assert 'eval/fine/text+image/mAP@1' in got_eval[0] and 'eval/clustering/text/NMI' in got_eval[0]
  for k, v in expected_eval[0].items():
    assert got_eval[0][k] == pytest.approx(v, abs=1e-6), k


def test_a_changed_batch_size_on_resume_is_refused(reference, data_dir):
  config = run_config(data_dir)
  config.batch_size *= 2  # the same step would end elsewhere in the input stream
  with pytest.raises(trainer.config_check.ConfigError,
                     match=f'--config.batch_size={config.batch_size // 2}'):
    trainer.train(config, reference[2])
