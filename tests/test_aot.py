"""`python -m scale_jax.aot`: the trainer's step compiled for a mesh of fake CPU devices and for
abstract TPU slices (libtpu, no TPU), memory per device reported, nothing run; FSDP's division of
parameter and optimizer bytes; meshes across slices and hosts."""
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from configs import tiny
from scale_jax import aot, config_check, sharding
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


def test_aot_command_compiles_for_fake_devices_and_reports_memory():
  # The subprocess sets its own device count (4 again: the program is test_trainer's, which the
  # suite's compilation cache may hold already): give it the environment without conftest's flag.
  env = dict(os.environ)
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


# --- TPU topologies, compiled here by libtpu (the tpu extra) -------------------------------------

def test_compiles_for_an_abstract_tpu_slice_and_reports_its_memory():
  config = tiny.get_config()
  config.modalities = ('text', 'image')
  config.mesh.update(data=2, fsdp=2, tensor=1)
  mesh = sharding.make_mesh(config.mesh, aot.tpu_devices('v5e:2x2'))
  assert {d.platform for d in mesh.devices.flat} == {'tpu'}
  setup, compiled = aot.compile_step(config, mesh)
  report = aot.memory_report(config, mesh, compiled, setup)
  # Sharded state bytes are exact, and the TPU compiler's figures are its own (TPU tiling pads
  # small arrays: the arguments exceed the state, unlike on the CPU).
  assert report['parameters + optimizer state'] == sharding.bytes_per_device(
      (setup.abstract_state.params, setup.abstract_state.opt_state))
  assert report['arguments'] >= report['parameters + optimizer state']
  assert 0 < report['total'] < aot.device_capacity(mesh) == 16 * 2 ** 30
  collectives = aot.collective_counts(compiled)
  assert collectives['all-gather'] > 0 and collectives['all-reduce'] > 0  # FSDP; gradient sums
  bound = aot.step_time_bound(config, mesh)  # the model's FLOPs at v5e's 197 TFLOP/s
  assert bound['seconds at peak'] == pytest.approx(
      bound['model TFLOP per device'] / 197, rel=1e-9)
  text = aot.format_report(report, config, mesh, aot.cost_report(compiled), collectives,
                           aot.device_capacity(mesh), bound)
  assert 'on 4 abstract TPU v5 lite devices' in text and '% used: fits' in text
  assert 'a lower bound on the step time' in text
  assert 'From the TPU compiler' in text


def test_multislice_mesh_keeps_fsdp_within_a_slice():
  devices = aot.tpu_devices('v5e:2x2', slices=2)
  mesh = sharding.make_mesh(dict(data=2, fsdp=4, tensor=1, dcn_data=2), devices)
  slices = np.vectorize(lambda d: d.slice_index)(mesh.devices)
  assert (slices[0] == 0).all() and (slices[1] == 1).all()  # one data position per slice
  with pytest.raises(ValueError, match='must divide'):
    sharding.make_mesh(dict(data=2, fsdp=4, tensor=1, dcn_fsdp=3), devices)
  with pytest.raises(ValueError, match='multiply to 4, but the devices lie in 2 slices'):
    sharding.make_mesh(dict(data=4, fsdp=2, tensor=1, dcn_data=4), devices)
  with pytest.raises(ValueError, match='multiply to 2, but the devices lie in 1 process:'):
    sharding.make_mesh(dict(data=2, fsdp=2, tensor=1, dcn_data=2), aot.tpu_devices('v5e:2x2'))


def test_a_tensor_group_across_processes_is_refused_with_the_reason():
  # v5e:4x4 has 4 hosts of 4 chips: tensor=8 would need two hosts to feed the same rows.
  config = tiny.get_config()
  config.mesh.update(data=1, fsdp=2, tensor=8)
  config.update(batch_size=16)
  config.eval.batch_size = 16
  mesh = sharding.make_mesh(config.mesh, aot.tpu_devices('v5e:4x4'))
  with pytest.raises(config_check.ConfigError, match=r'tensor group.*mesh.tensor <= 4'):
    config_check.check(config, mesh)
  config.mesh.update(fsdp=8, tensor=2)  # a pair of chips on one host: fine
  config_check.check(config, sharding.make_mesh(config.mesh, aot.tpu_devices('v5e:4x4')))


def test_gpu_topologies_are_refused_with_what_to_do_instead():
  with pytest.raises(aot.app.UsageError, match='only with that GPU attached'):
    aot.tpu_devices('h100:2x8')
