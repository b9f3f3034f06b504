"""Writes tests/data/mel_reference.npz: librosa's mel filterbank and log-mel spectrogram for a fixed
test waveform, the golden reference tests/test_mel.py checks scale_jax.data.media against.

librosa is not a dependency of this project; run this by hand in a throwaway environment:

  python3 -m venv /tmp/librosa_venv && /tmp/librosa_venv/bin/pip install librosa scipy numpy
  /tmp/librosa_venv/bin/python tests/data/make_mel_reference.py

Reference convention: librosa.filters.mel(htk=True, norm=None) (HTK mel scale, unnormalised
triangles) and librosa.feature.melspectrogram(window='hann', center=False, power=2.0) (periodic
Hann, no centring pad, plain |FFT|^2 power), then log(x + 1e-6).
"""
import pathlib

import librosa
import numpy as np
import scipy.signal

SAMPLE_RATE = 16000
# (n_fft, hop, n_mels): the paper config's and the demo config's.
SETTINGS = ((1024, 256, 80), (512, 256, 32))


def test_wave() -> np.ndarray:
  """1 s float32: a 100 Hz -> 7 kHz linear chirp plus white noise (seed 0)."""
  t = np.arange(SAMPLE_RATE) / SAMPLE_RATE
  noise = np.random.default_rng(0).standard_normal(SAMPLE_RATE)
  return (0.5 * scipy.signal.chirp(t, 100.0, 1.0, 7000.0) + 0.05 * noise).astype(np.float32)


def main():
  wave = test_wave()
  out = {'wave': wave, 'sample_rate': np.int64(SAMPLE_RATE),
         'librosa_version': np.array(librosa.__version__)}
  for n_fft, hop, n_mels in SETTINGS:
    key = f'{n_fft}_{hop}_{n_mels}'
    out[f'filterbank_{key}'] = librosa.filters.mel(
        sr=SAMPLE_RATE, n_fft=n_fft, n_mels=n_mels, htk=True, norm=None).T  # [n_fft//2+1, n_mels]
    power = librosa.feature.melspectrogram(
        y=wave, sr=SAMPLE_RATE, n_fft=n_fft, hop_length=hop, window='hann', center=False,
        power=2.0, n_mels=n_mels, htk=True, norm=None)
    out[f'log_mel_{key}'] = np.log(power.T + 1e-6).astype(np.float32)  # [frames, n_mels]
  path = pathlib.Path(__file__).with_name('mel_reference.npz')
  np.savez_compressed(path, **out)
  print(f'wrote {path} ({path.stat().st_size} bytes) with librosa {librosa.__version__}')


if __name__ == '__main__':
  main()
