"""The audio: a log-mel spectrogram of the first `seconds`, standardised per clip, cut into
time x frequency patches; masked audio modelling (MAM).

A clip shorter than `seconds` is zero-padded to the window; the patches that hold only padding are
invalid (out of attention, never masked) and the padding is left out of the clip's statistics.
"""
import numpy as np

from scale_jax.modalities.base import PatchModality, divides, patchify


def window_samples(c) -> int:
  return int(c['sample_rate'] * c['seconds'])


def spectrogram_frames(c) -> int:
  """STFT frames of the window (no centring: frame i covers samples [i * hop, i * hop + n_fft))."""
  return (window_samples(c) - c['n_fft']) // c['hop'] + 1


def frames(c) -> int:
  """The frames cut into patches: the spectrogram's, down to a multiple of patch_time."""
  return spectrogram_frames(c) // c['patch_time'] * c['patch_time']


class Audio(PatchModality):
  name, field, objective = 'audio', 'audio', 'mam'

  def media_positions(self, c):
    return frames(c) // c['patch_time'] * (c['n_mels'] // c['patch_freq'])

  def media_patch_dim(self, c):
    return c['patch_time'] * c['patch_freq']

  def preprocess_media(self, ex, present, c):
    from scale_jax.data import media  # pylint: disable=g-import-not-at-top  (decoders: data only)
    n = frames(c)
    spec = np.zeros((n, c['n_mels']), np.float32)
    real = 0  # frames that start inside the clip; the rest of the window is padding
    if present:
      data = ex['video'] if ex['audio_in_video'] else ex['audio']  # a video's sound track
      wave, samples = media.decode_audio(data, c['sample_rate'], c['seconds'])
      mel = media.log_mel(wave, c['sample_rate'], c['n_fft'], c['hop'], c['n_mels'])[:n]
      real = min(n, -(-samples // c['hop']))
      mel = mel[:real]
      spec[:real] = (mel - mel.mean()) / (mel.std() + 1e-5)
    patches = patchify(spec[..., None], c['patch_time'], c['patch_freq'])
    # Patches are row-major over (time, frequency): a time row is valid if it starts in the clip.
    rows_valid = np.arange(n // c['patch_time']) * c['patch_time'] < real
    return {'audio_input': patches,
            'audio_valid': np.repeat(rows_valid, c['n_mels'] // c['patch_freq'])}

  def check_bytes(self, data):
    from scale_jax.data import media  # pylint: disable=g-import-not-at-top
    # The whole clip: what any window of it may read. Silence (a muted video's track) is no
    # audio: every silent product would bring the same all-zero spectrogram.
    media.check_sound(media.decode_audio(data, 16000)[0])

  def check_media(self, c):
    window = window_samples(c)
    if window < c['n_fft']:
      seconds = c['n_fft'] / c['sample_rate']
      return [f'config.audio.seconds={c["seconds"]} gives {window} samples, fewer than one '
              f'window of config.audio.n_fft={c["n_fft"]}; e.g. --config.audio.seconds='
              f'{max(1.0, np.ceil(seconds * 10) / 10)}']
    problems = divides(c, 'audio', 'patch_freq', 'n_mels')
    from scale_jax.data import media  # pylint: disable=g-import-not-at-top

    def empty(n_mels):  # bands too narrow to hold an FFT bin: always 0, log(1e-6) after the log
      return int((media.mel_filterbank(c['sample_rate'], c['n_fft'], n_mels).max(0) == 0).sum())
    if c['n_mels'] > 0 and empty(c['n_mels']):
      fits = max(n for n in range(1, c['n_mels']) if not empty(n))
      problems.append(f'config.audio.n_mels={c["n_mels"]} with n_fft={c["n_fft"]}: '
                      f'{empty(c["n_mels"])} mel bands hold no FFT bin (inputs that are always '
                      f'the same); e.g. --config.audio.n_mels={fits} or a larger n_fft')
    if spectrogram_frames(c) < c['patch_time']:
      problems.append(f'config.audio.patch_time={c["patch_time"]} is longer than the '
                      f'{spectrogram_frames(c)} spectrogram frames of {c["seconds"]} s; e.g. '
                      f'--config.audio.patch_time={spectrogram_frames(c)}')
    return problems


AUDIO = Audio()
