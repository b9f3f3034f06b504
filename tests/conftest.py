"""Shared fixtures. Four fake CPU devices, so sharded code runs as on a small pod slice."""
import os

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '')
                           + ' --xla_force_host_platform_device_count=4')
# The tpu extra's libtpu would otherwise look for a TPU first (the TPU compiles of test_aot.py
# use abstract devices, which need no TPU backend).
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# pylint: disable=g-import-not-at-top,wrong-import-position
import pytest

from configs import tiny
from scale_jax.data import build, synthetic


@pytest.fixture(scope='session')
def raw_dir(tmp_path_factory):
  """A small synthetic catalogue in the raw layout."""
  out = tmp_path_factory.mktemp('raw')
  synthetic.write_catalogue(str(out), num_products=96, seed=0, progress=False)
  return str(out)


@pytest.fixture(scope='session')
def data_dir(raw_dir, tmp_path_factory):
  """The catalogue built into a TFDS dataset plus tokenizer."""
  out = tmp_path_factory.mktemp('data')
  build.build(raw_dir, str(out), vocab_size=400, test_fraction=0.2, val_fraction=0.2,
              progress=False)
  return str(out)


@pytest.fixture
def config(data_dir):
  c = tiny.get_config()
  c.data.dir = data_dir
  return c
