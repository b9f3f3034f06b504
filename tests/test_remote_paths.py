"""gs:// run and data directories, against an in-memory stand-in for GCS (no network here): an
fsspec filesystem registered for gs:// that, like GCS, stores whole objects and cannot append.
etils epath (and so Orbax's metadata and TFDS) reaches gs:// through fsspec when TensorFlow is
absent; the array data of Orbax and ArrayRecord go through tensorstore's and ArrayRecord's own
GCS clients, which this stand-in does not reach (docs/scaling.md says what is exercised)."""
import json
import os

import numpy as np
import pytest
from etils import epath
from etils.epath import backend
from fsspec.implementations.memory import MemoryFileSystem

from scale_jax import run_config
from scale_jax import train as trainer
from scale_jax.data import build, pipeline


class FakeGCS(MemoryFileSystem):
  """gs://bucket/key -> an in-memory object; opening one for append fails, as on GCS."""
  protocol = ('gs', 'gcs')
  store, pseudo_dirs = {}, ['']

  @classmethod
  def _strip_protocol(cls, path):
    path = str(path)
    for prefix in ('gs://', 'gcs://'):
      if path.startswith(prefix):
        path = path[len(prefix):]
    return super()._strip_protocol(path)

  def _open(self, path, mode='rb', **kwargs):
    if 'a' in mode:
      raise NotImplementedError(f'{path}: GCS objects cannot be appended to')
    return super()._open(path, mode, **kwargs)


@pytest.fixture
def gcs(monkeypatch):
  import fsspec  # pylint: disable=g-import-not-at-top
  for protocol in FakeGCS.protocol:
    fsspec.register_implementation(protocol, FakeGCS, clobber=True)
  backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access
  monkeypatch.setattr(FakeGCS, 'store', {})
  monkeypatch.setattr(FakeGCS, 'pseudo_dirs', [''])
  yield epath.Path('gs://bucket')
  backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access


def test_the_stand_in_refuses_appends_as_gcs_does(gcs):
  (gcs / 'x').write_text('a\n')
  with pytest.raises(NotImplementedError):
    with (gcs / 'x').open('a') as f:
      f.write('b\n')


def _rows(path):
  return [json.loads(line) for line in path.read_text().splitlines()]


def test_metrics_reach_a_gs_workdir_and_a_resume_carries_them_on(gcs, monkeypatch):
  # time.monotonic() counts from boot: a fresh TPU VM's is small, and the first row must not wait.
  monkeypatch.setattr(trainer.time, 'monotonic', lambda: 10.0)
  workdir = str(gcs / 'run')
  writer = trainer.MetricsWriter(workdir, sync_every_s=3600)
  writer.write(1, {'loss': 2.0})  # the first row is uploaded at once ...
  assert [r['step'] for r in _rows(gcs / 'run' / 'metrics.jsonl')] == [1]
  writer.write(2, {'loss': 1.5})  # ... the next ones wait for sync_every_s, or a checkpoint
  assert [r['step'] for r in _rows(gcs / 'run' / 'metrics.jsonl')] == [1]
  writer.sync()
  assert [r['step'] for r in _rows(gcs / 'run' / 'metrics.jsonl')] == [1, 2]
  staging = writer.local
  writer.close()
  assert not os.path.exists(staging)
  events = list((gcs / 'run' / 'tensorboard').iterdir())
  assert len(events) == 1 and events[0].name.startswith('events')
  assert events[0].stat().length > 0

  resumed = trainer.MetricsWriter(workdir)
  resumed.write(3, {'loss': 1.0})
  resumed.close()
  assert [r['step'] for r in _rows(gcs / 'run' / 'metrics.jsonl')] == [1, 2, 3]
  assert len(list((gcs / 'run' / 'tensorboard').iterdir())) == 2


def test_a_local_workdir_is_written_in_place(tmp_path):
  writer = trainer.MetricsWriter(str(tmp_path))
  writer.write(1, {'loss': 2.0})
  assert writer.local == str(tmp_path)
  assert [r['step'] for r in _rows(epath.Path(tmp_path) / 'metrics.jsonl')] == [1]
  writer.close()
  assert os.path.isdir(tmp_path / 'tensorboard')


def test_the_run_config_round_trips_through_gs(gcs, config):
  run_config.save(config, str(gcs / 'run'))
  assert run_config.differences(run_config.load(str(gcs / 'run')), config) == []


def test_a_gs_data_dir_gives_its_tokenizer_categories_and_presence(gcs, data_dir):
  remote = str(gcs / 'data')
  for path in (build.tokenizer_path, build.categories_path, build.presence_path):
    target = epath.Path(path(remote))
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(epath.Path(path(data_dir)).read_bytes())
  assert pipeline.vocab_size(remote) == pipeline.vocab_size(data_dir)
  assert build.load_categories(remote) == build.load_categories(data_dir)
  for got, want in zip(build.load_presence(remote, "train"),
                       build.load_presence(data_dir, "train")):
    np.testing.assert_array_equal(got, want)
  with pytest.raises(FileNotFoundError, match='gs://bucket/empty/categories.json'):
    build.load_categories(str(gcs / 'empty'))
