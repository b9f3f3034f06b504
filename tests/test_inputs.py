"""What the model learns from: masks follow the objectives, audio padding is padding, products
without the run's modalities are left out, replacements come from the tokenizer, the config is
checked first, and the model does not load the data stack."""
import io
import subprocess
import sys

import numpy as np
import pytest
import soundfile

from configs import clip_peer, paper, paper_released, tiny
from scale_jax import config_check, modalities, sharding
from scale_jax.data import build, media, pipeline, tokenizer
from scale_jax.modalities import audio


def test_importing_the_model_loads_no_data_stack():
  code = ('import sys, scale_jax.model.scale, scale_jax.losses, scale_jax.modalities; '
          'print(",".join(m for m in sys.modules if m.split(".")[0] in '
          '("tensorflow_datasets", "grain", "av", "tensorflow")))')
  loaded = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                          check=True).stdout.strip()
  assert loaded == ''


def test_modalities_whose_objective_is_off_are_seen_clean(config):
  config.loss.mlm = 0.0  # no MLM: captions are not corrupted
  config.image.mask_rate = 0.0  # no MRM: no mask-token patches
  assert modalities.masked(config) == ('table', 'video', 'audio')
  batch = next(iter(pipeline.train_dataset(config)))
  for key in ('text_masked', 'text_target', 'image_masked'):
    assert key not in batch
  assert not (batch['text_input'] == tokenizer.MASK).any()
  assert batch['table_masked'].any() and 'table_target' in batch
  cfg = pipeline._plain(config)
  source = pipeline.open_split(config.data.dir, 'train')
  mask = pipeline.Mask(cfg, np.arange(5, 300), config.seed, len(source))
  for i in range(10):
    clean = pipeline.Preprocess(cfg).map(source[i])
    drawn = mask.map_with_index(i, clean)
    np.testing.assert_array_equal(drawn['text_input'], clean['text_input'])
    np.testing.assert_array_equal(drawn['image_input'], clean['image_input'])
  assert modalities.masked(clip_peer.get_config()) == ()  # the two-tower CLIP trains clean


def _wav(seconds, rate=16000):
  t = np.arange(int(seconds * rate)) / rate
  buf = io.BytesIO()
  soundfile.write(buf, (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), rate,
                  format='WAV', subtype='PCM_16')
  return buf.getvalue()


def test_audio_padding_is_invalid_never_masked_and_outside_the_statistics():
  c = tiny.get_config().audio  # 0.5 s window: 30 frames, 24 used, 3 x 2 patches of 8 x 8
  spec = modalities.get('audio')
  out = spec.preprocess({'audio': _wav(0.2), 'audio_in_video': False}, True, c)
  # 0.2 s = 3200 samples: frames 0..12 start inside the clip, so time rows 0 and 1 are real.
  np.testing.assert_array_equal(out['audio_valid'], [True, True, True, True, False, False])
  assert not out['audio_input'][~out['audio_valid']].any()
  wave, samples = media.decode_audio(_wav(0.2), 16000, 0.5)
  assert samples == 3200
  mel = media.log_mel(wave, 16000, c.n_fft, c.hop, c.n_mels)[:13]
  real = np.zeros((24, c.n_mels), np.float32)
  real[:13] = (mel - mel.mean()) / (mel.std() + 1e-5)  # the clip's own statistics
  np.testing.assert_allclose(out['audio_input'], modalities.base.patchify(real[..., None], 8, 8),
                             atol=1e-5)
  rng = np.random.default_rng(0)
  c.mask_rate = 0.9
  for _ in range(20):
    assert not (spec.draw_mask(out, rng, c) & ~out['audio_valid']).any()
  full = spec.preprocess({'audio': _wav(1.0), 'audio_in_video': False}, True, c)
  assert full['audio_valid'].all()


def test_audio_frames_are_what_log_mel_gives():
  c = paper.get_config().audio
  wave = np.random.default_rng(0).normal(size=audio.window_samples(c)).astype(np.float32)
  assert media.log_mel(wave, c.sample_rate, c.n_fft, c.hop, c.n_mels).shape[0] == 747
  assert audio.spectrogram_frames(c) == 747 and audio.frames(c) == 740
  assert modalities.get('audio').num_tokens(c) == 81  # 10 x 8 patches + the global token


def test_products_without_the_runs_modalities_are_left_out(config, caplog):
  config.modalities = ('text',)
  present, _ = build.load_presence(config.data.dir, 'train')
  has_text = present[:, 0]
  assert 0 < has_text.sum() < len(has_text)  # the fixture has products without a caption
  seen = 0
  for batch, n in pipeline.eval_batches(config, 'train', config.batch_size):
    assert batch['present'][:n, 0].all()
    seen += n
  assert seen == has_text.sum()
  assert f'left out {(~has_text).sum()} of {len(has_text)} products' in caplog.text
  batch = next(iter(pipeline.train_dataset(config)))
  assert batch['present'].all()
  assert 'no product has' not in caplog.text


def test_a_batch_larger_than_the_train_split_is_refused(config):
  products = len(pipeline.usable_rows(config, 'train'))
  config.batch_size = 4 * (products // 4 + 1)
  with pytest.raises(ValueError, match=f'config.batch_size={config.batch_size} is more than the '
                                       f'{products} train products'):
    pipeline.train_dataset(config)


def test_a_modality_no_product_has_is_warned_about(config, caplog):
  config.image.source = 'features'  # the fixture's products bring no image features
  pipeline.usable_rows(config, 'train', training=True)
  pipeline.usable_rows(config, 'test')
  assert ("train split: no product has image in the form config.image.source='features' reads: "
          'its encoder and losses learn nothing' in caplog.text)
  assert ("test split: no product has image in the form config.image.source='features' reads: "
          'evaluation rows that need it are n/a' in caplog.text)
  assert caplog.text.count('no product has') == 2


def test_mlm_replacements_come_from_the_tokenizer(config):
  config.text.mask_rate = 0.9
  tok = tokenizer.load_tokenizer(build.tokenizer_path(config.data.dir))
  allowed = tokenizer.replacement_ids(tok)
  assert len(allowed) and allowed.max() < tok.vocab_size() < config.model.vocab_size
  assert not np.isin(allowed, tokenizer.SPECIAL_IDS).any()
  replaced = []
  for _, batch in zip(range(6), pipeline.train_dataset(config)):
    swapped = batch['text_masked'] & (batch['text_input'] != batch['text_target'])
    replaced += batch['text_input'][swapped & (batch['text_input'] != tokenizer.MASK)].tolist()
  assert len(replaced) > 5
  assert np.isin(replaced, allowed).all()


BAD_CONFIGS = {
    'image patch': (lambda c: c.image.update(patch=5),
                    'config.image.patch=5 does not divide config.image.size=16; e.g. '
                    '--config.image.patch=4'),
    'heads': (lambda c: c.model.update(width=30, heads=4),
              'config.model.width=30 does not split into config.model.heads=4 heads; e.g. '
              '--config.model.heads=3'),
    'audio window': (lambda c: c.audio.update(seconds=0.01),
                     'config.audio.seconds=0.01 gives 160 samples, fewer than one window of '
                     'config.audio.n_fft=512'),
    'mel bands': (lambda c: c.audio.update(patch_freq=5),
                  'config.audio.patch_freq=5 does not divide config.audio.n_mels=16'),
    'eval batch': (lambda c: c.eval.update(batch_size=6),
                   'config.eval.batch_size=6 does not split over the 4 devices of mesh axes '
                   'data x fsdp; e.g. --config.eval.batch_size=4'),
    'batch': (lambda c: c.update(batch_size=10), 'config.batch_size=10 does not split'),
    'table unit': (lambda c: c.table.update(mask_unit='word'), "config.table.mask_unit='word'"),
    'max masked': (lambda c: c.text.update(max_masked=13),
                   'config.text.max_masked=13 must be in [0, max_len=12]'),
    'empty mel bands': (lambda c: c.audio.update(n_fft=256, hop=128, n_mels=256, patch_freq=8),
                        'config.audio.n_mels=256 with n_fft=256: 75 mel bands hold no FFT bin'),
    'empty caption': (lambda c: c.text.update(max_len=2),
                      'config.text.max_len=2 leaves no room for a token between [CLS] and [SEP]'),
    'no image': (lambda c: c.image.update(size=0), 'config.image.size=0 must be positive'),
    'log every': (lambda c: c.update(log_every=0), 'config.log_every=0 must be at least 1'),
    'checkpoint every': (lambda c: c.update(checkpoint_every=0),
                         'config.checkpoint_every=0 must be at least 1'),
    'tensor split': (lambda c: c.mesh.update(data=1, tensor=4),
                     'config.model.heads=2 does not split over config.mesh.tensor=4 devices; '
                     'choose a mesh.tensor that divides it (e.g. 2)'),
    'checkpoint keep': (lambda c: c.update(checkpoint_keep=0),
                        'config.checkpoint_keep=0 would keep no checkpoint'),
    'negative lr': (lambda c: c.optimizer.update(lr=-1.0),
                    'config.optimizer.lr=-1.0 must be > 0.0; e.g. --config.optimizer.lr=0.001'),
    'beta': (lambda c: c.optimizer.update(b2=1.0),
             'config.optimizer.b2=1.0 must be >= 0.0 and < 1.0'),
    'decay': (lambda c: c.optimizer.update(decay='step'),
              "config.optimizer.decay='step': one of cosine, linear"),
    'no loss': (lambda c: c.update(modalities=('image',), loss=dict(c.loss, mrm=0.0)),
                "config.loss: no loss is on for config.modalities=('image',)"),
    # Heads on the encoders and no gradient through the weights: no loss reaches the joint.
    'untrained joint': (lambda c: c.model.update(masked_heads_on='encoder'),
                        'config.model.joint_layers=1: the joint co-transformer would never train'),
}


@pytest.mark.parametrize('name', BAD_CONFIGS)
def test_config_problems_are_named_before_any_work(name, tmp_path):
  config = tiny.get_config()
  edit, message = BAD_CONFIGS[name]
  edit(config)
  mesh = sharding.make_mesh(config.mesh)
  with pytest.raises(config_check.ConfigError) as e:
    config_check.check(config, mesh)
  assert message in str(e.value)
  from scale_jax.train import train  # pylint: disable=g-import-not-at-top
  config.data.dir = str(tmp_path / 'no_dataset_here')  # the check comes before any data work
  with pytest.raises(config_check.ConfigError, match='the config cannot run'):
    train(config, str(tmp_path / 'run'))


def test_shipped_configs_pass_the_check():
  for module in (tiny, clip_peer, paper, paper_released):
    config_check.check(module.get_config())
