"""`python -m scale_jax.aot`: the trainer's step compiled for a mesh of fake devices, memory per
device reported, nothing run; and FSDP's division of parameter and optimizer bytes."""
import os
import re
import subprocess
import sys

import pytest

from configs import tiny
from scale_jax import aot, sharding
from scale_jax.train import build_train_setup

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def state_bytes(mesh_sizes, modalities=None):
  config = tiny.get_config()
  config.mesh.update(mesh_sizes)
  config.modalities = modalities or config.modalities
  setup = build_train_setup(config, sharding.make_mesh(config.mesh))
  return sharding.bytes_per_device((setup.abstract_state.params, setup.abstract_state.opt_state))


def test_fsdp_divides_parameter_and_optimizer_bytes_per_device():
  replicated = state_bytes(dict(data=4, fsdp=1, tensor=1))
  fsdp = state_bytes(dict(data=1, fsdp=4, tensor=1))
  # About 1/4: biases and other vectors without an 'embed' axis stay whole on every device.
  assert 0.25 <= fsdp / replicated < 0.3


def test_parse_mesh():
  assert aot.parse_mesh('data=2,fsdp=8') == {'data': 2, 'fsdp': 8, 'tensor': 1}
  with pytest.raises(ValueError, match='positive sizes'):
    aot.parse_mesh('data=2,model=4')


def test_aot_command_compiles_for_fake_devices_and_reports_memory(tmp_path_factory):
  # The subprocess sets its own device count (4 again: the program is test_trainer's, which a
  # shared compilation cache may hold already): give it the environment without conftest's flag.
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(
      tmp_path_factory.getbasetemp() / 'jax-compilation-cache'))
  env['XLA_FLAGS'] = env.get('XLA_FLAGS', '').replace(
      ' --xla_force_host_platform_device_count=4', '')
  proc = subprocess.run(
      [sys.executable, '-m', 'scale_jax.aot', '--config', 'configs/tiny.py',
       '--mesh', 'data=2,fsdp=2', '--config.total_steps=12',
       "--config.modalities=('text', 'image')"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=550)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = proc.stdout
  assert 'mesh data=2 fsdp=2 tensor=1 on 4 fake CPU devices' in out
  assert 'From the CPU compiler' in out
  mib = {m.group(1).strip(): float(m.group(2))
         for m in re.finditer(r'^  (.+?)\s+([0-9.]+) MiB$', out, re.MULTILINE)}
  expected = state_bytes(dict(data=2, fsdp=2, tensor=1), ('text', 'image')) / 2 ** 20
  assert mib['parameters + optimizer state'] == pytest.approx(expected, abs=1e-3)
  assert mib['arguments'] >= mib['parameters + optimizer state']
  assert mib['total'] >= mib['arguments'] and mib['temporaries'] > 0
