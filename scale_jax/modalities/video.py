"""The video: about `fps` frames a second (the paper's one), at most num_frames, each frame one
token of frame_size x frame_size x 3 values; masked frame prediction (MFP)."""
import numpy as np

from scale_jax.modalities.base import PatchModality


class Video(PatchModality):
  name, field, objective = 'video', 'video', 'mfp'

  def media_positions(self, c):
    return c['num_frames']

  def media_patch_dim(self, c):
    return c['frame_size'] ** 2 * 3

  def preprocess_media(self, ex, present, c):
    from scale_jax.data import media  # pylint: disable=g-import-not-at-top  (decoders: data only)
    frames = np.zeros((c['num_frames'], c['frame_size'], c['frame_size'], 3), np.float32)
    count = 0
    if present:
      frames, count = media.decode_video(ex['video'], c['num_frames'], c['frame_size'], c['fps'])
      frames[:count] = frames[:count] * 2 - 1
    return {'video_input': frames.reshape(c['num_frames'], -1),
            'video_valid': np.arange(c['num_frames']) < count}

  def check_bytes(self, data):
    from scale_jax.data import media  # pylint: disable=g-import-not-at-top
    media.decode_video(data, 1, 8, 1.0)

  def check_media(self, c):
    problems = []
    for key in ('num_frames', 'frame_size'):
      if c[key] < 1:
        problems.append(f'config.video.{key}={c[key]} must be at least 1')
    if c['fps'] <= 0:
      problems.append(f'config.video.fps={c["fps"]} must be positive; e.g. 1.0 (the paper)')
    return problems


VIDEO = Video()
