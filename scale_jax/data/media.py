"""Decoding of encoded media bytes into arrays. Pure numpy: this runs in Grain worker processes.

Each decoder raises MediaError with the reason when the bytes cannot be decoded; callers add the
file name.
"""
import io

import av
import numpy as np
import scipy.signal
import soundfile
from PIL import Image


class MediaError(ValueError):
  """Encoded media that cannot be decoded."""


def decode_image(data: bytes, size: int) -> np.ndarray:
  """JPEG/PNG bytes -> float32 [size, size, 3] in [0, 1]."""
  try:
    img = Image.open(io.BytesIO(data))
    img = img.convert('RGB').resize((size, size), Image.BILINEAR)
  except Exception as e:  # PIL raises several unrelated types for corrupt files
    raise MediaError(f'cannot decode image: {e}') from e
  return np.asarray(img, np.float32) / 255.0


def _frame_to_rgb(frame, size: int) -> np.ndarray:
  """A decoded frame -> float32 RGB [size, size, 3] in [0, 1].

  Resizes the Y, U and V planes first (uint8, PIL) and converts to RGB (BT.601) at the small size,
  in numpy: swscale's conversion costs several times the decoding itself at these sizes.
  """
  if frame.format.name != 'yuv420p':
    frame = frame.reformat(format='yuv420p')
  h, w = frame.height, frame.width
  yuv = frame.to_ndarray(format='yuv420p')
  planes = (yuv[:h], *yuv[h:].reshape(2, h // 2, w // 2))
  y, u, v = (np.asarray(Image.fromarray(p).resize((size, size), Image.BILINEAR), np.float32)
             for p in planes)
  u, v = u - 128.0, v - 128.0
  if frame.color_range != 2:  # limited ("MPEG") range, the H.264 default: Y in 16..235
    y, u, v = (y - 16.0) * (255.0 / 219.0), u * (255.0 / 224.0), v * (255.0 / 224.0)
  rgb = np.stack([y + 1.402 * v, y - 0.344136 * u - 0.714136 * v, y + 1.772 * u], axis=-1)
  return np.clip(rgb, 0.0, 255.0) / 255.0


def decode_video(data: bytes, num_frames: int, size: int, fps: float) -> tuple[np.ndarray, int]:
  """MP4 bytes -> (float32 [num_frames, size, size, 3] in [0, 1], number of real frames).

  Frames are taken about `fps` per second from the start (the paper's one per second), at most
  num_frames of them; the rest of the array is zeros.
  """
  out = np.zeros((num_frames, size, size, 3), np.float32)
  count, next_time = 0, 0.0
  try:
    with av.open(io.BytesIO(data)) as container:
      stream = container.streams.video[0]
      stream.thread_type = 'NONE'  # one decoder thread: the pipeline parallelises over examples
      for frame in container.decode(stream):
        if frame.time is not None and frame.time + 1e-6 < next_time:
          continue
        out[count] = _frame_to_rgb(frame, size)
        count += 1
        next_time += 1.0 / fps
        if count == num_frames:
          break
  except (av.FFmpegError, IndexError, ValueError) as e:
    raise MediaError(f'cannot decode video: {e}') from e
  if not count:
    raise MediaError('video has no frames')
  return out, count


def _read_sound_track(data: bytes) -> tuple[np.ndarray, int]:
  """The first audio stream of any container FFmpeg reads (an MP4's sound track, AAC, MP3):
  (float32 [samples], rate), mixed to mono."""
  chunks, rate = [], None
  with av.open(io.BytesIO(data)) as container:
    if not container.streams.audio:
      raise MediaError('no audio stream in the file')
    stream = container.streams.audio[0]
    for frame in container.decode(stream):
      rate = frame.sample_rate
      samples = frame.to_ndarray().astype(np.float32)  # [channels, n] planar or [1, n * ch]
      if not frame.format.is_planar:
        samples = samples.reshape(-1, len(frame.layout.channels)).T
      if frame.format.name.startswith(('s16', 's32')):  # integer PCM -> [-1, 1]
        samples /= float(2 ** (8 * frame.format.bytes - 1))
      chunks.append(samples.mean(axis=0))
  if not chunks:
    raise MediaError('audio is empty')
  return np.concatenate(chunks), rate


def decode_audio(data: bytes, sample_rate: int, seconds: float) -> np.ndarray:
  """Audio bytes -> mono float32 waveform at sample_rate, first `seconds`, zero-padded.

  WAV/FLAC/OGG through libsndfile; anything else FFmpeg reads (an MP4 video's sound track
  included) through PyAV.
  """
  try:
    wave, rate = soundfile.read(io.BytesIO(data), dtype='float32', always_2d=True)
    wave = wave.mean(axis=1)
  except (soundfile.LibsndfileError, RuntimeError, TypeError):
    try:
      wave, rate = _read_sound_track(data)
    except (av.FFmpegError, IndexError, ValueError) as e:
      raise MediaError(f'cannot decode audio: {e}') from e
  if wave.size == 0:
    raise MediaError('audio is empty')
  if rate != sample_rate:
    g = np.gcd(rate, sample_rate)
    wave = scipy.signal.resample_poly(wave, sample_rate // g, rate // g).astype(np.float32)
  length = int(sample_rate * seconds)
  return np.pad(wave[:length], (0, max(0, length - wave.shape[0])))


def decode_features(data: bytes) -> np.ndarray:
  """.npy bytes of a pre-extracted [tokens, dim] (or [dim]) array -> float32 [tokens, dim]."""
  try:
    x = np.load(io.BytesIO(data), allow_pickle=False)
  except (ValueError, OSError, EOFError) as e:
    raise MediaError(f'cannot read features: {e}') from e
  if x.ndim == 1:
    x = x[None]
  if x.ndim != 2 or not x.size or not np.issubdtype(x.dtype, np.number):
    raise MediaError(f'features must be a non-empty numeric [tokens, dim] array, not '
                     f'{x.dtype} {list(x.shape)}')
  if not np.isfinite(x).all():
    raise MediaError('features hold NaN or Inf')
  return x.astype(np.float32)


def _mel_filterbank(sample_rate: int, n_fft: int, n_mels: int) -> np.ndarray:
  """Triangular filters on the HTK mel scale, [n_fft // 2 + 1, n_mels]."""
  def hz_to_mel(f):
    return 2595.0 * np.log10(1.0 + f / 700.0)

  def mel_to_hz(m):
    return 700.0 * (10.0 ** (m / 2595.0) - 1.0)

  fft_freqs = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
  edges = mel_to_hz(np.linspace(hz_to_mel(0.0), hz_to_mel(sample_rate / 2), n_mels + 2))
  lower, centre, upper = edges[:-2], edges[1:-1], edges[2:]
  up = (fft_freqs[:, None] - lower) / (centre - lower)
  down = (upper - fft_freqs[:, None]) / (upper - centre)
  return np.maximum(0.0, np.minimum(up, down)).astype(np.float32)


def log_mel(wave: np.ndarray, sample_rate: int, n_fft: int, hop: int, n_mels: int) -> np.ndarray:
  """Log-mel spectrogram [frames, n_mels]: Hann-windowed power STFT, mel filters, log(x + 1e-6).

  Matches librosa.feature.melspectrogram(center=False, power=2.0, htk=True, norm=None) followed
  by log(x + 1e-6); tests/test_mel.py checks this against a stored librosa reference.
  """
  window = scipy.signal.get_window('hann', n_fft)  # periodic Hann, as librosa's
  _, _, spec = scipy.signal.stft(wave, fs=sample_rate, window=window, nperseg=n_fft,
                                 noverlap=n_fft - hop, boundary=None, padded=False,
                                 scaling='spectrum')
  # scaling='spectrum' divides the FFT by window.sum(); undo it for the plain |FFT|^2 power.
  power = np.abs(spec.T * window.sum()) ** 2  # [frames, n_fft // 2 + 1]
  return np.log(power @ _mel_filterbank(sample_rate, n_fft, n_mels) + 1e-6).astype(np.float32)
