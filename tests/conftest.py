"""Shared fixtures. Four fake CPU devices, so sharded code runs as on a small pod slice."""
import os

# The suite compiles far more than it runs: at its tiny shapes LLVM's optimisations take about
# half of a step's compile time (32 s -> 18 s for the tiny five-modality step) and save nothing.
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '')
                           + ' --xla_force_host_platform_device_count=4'
                           + ' --xla_backend_optimization_level=0')
# The tpu extra's libtpu would otherwise look for a TPU first (the TPU compiles of test_aot.py
# use abstract devices, which need no TPU backend).
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# pylint: disable=g-import-not-at-top,wrong-import-position
import pytest
from jax.experimental.compilation_cache import compilation_cache

from configs import tiny
from scale_jax.data import build, synthetic


@pytest.fixture(scope='session', autouse=True)
def cache_dir(tmp_path_factory):
  """One persistent compilation cache for the whole suite and the processes it starts: a program
  that several tests compile (the tiny step, a resumed run's step, the evaluation command's and
  the notebook's feature extraction, every process of a multi-host run) compiles once."""
  path = str(tmp_path_factory.getbasetemp() / 'jax-compilation-cache')
  os.environ['JAX_COMPILATION_CACHE_DIR'] = path  # subprocesses
  compilation_cache.set_cache_dir(path)
  compilation_cache.reset_cache()
  return path


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
