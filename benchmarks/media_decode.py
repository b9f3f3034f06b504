r"""Times the media decoders on shop-like files, what a real catalogue's products cost the input
pipeline, at a config's sizes.

    python benchmarks/media_decode.py [--config configs/paper.py] [--repeats 5] [--files DIR]
        [--config.video.num_frames=N ...]

The files are generated once into --files (kept, so that two checkouts time the same bytes):
- H.264 video, 1280 x 720, 14 s at 30 fps, about 5 Mbit/s (a moving picture with block noise), in
  three encodings: a keyframe every second and no B-frames (as phones record), every 2 s with
  B-frames, and x264's defaults (a keyframe every 250 frames at most, B-frames);
- a 60 s 44.1 kHz stereo 16-bit WAV;
- an 800 px photo-like JPEG (quality 90).

Each is decoded as the pipeline does (`scale_jax.data.media`, the config's `video`, `audio` and
`image` sizes), --repeats times, and the best time is printed, with the load average before and
after (the timings share the machine). To compare two checkouts, run this from each in turn, a few
times alternating, with the same --files.
"""
import io
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top,wrong-import-position
import av
import numpy as np
import soundfile
from absl import app, flags
from ml_collections import config_flags
from PIL import Image

from scale_jax.data import media

config_flags.DEFINE_config_file('config', 'configs/paper.py', 'whose media sizes to decode at',
                                lock_config=True)
flags.DEFINE_integer('repeats', 5, 'timed decodes of each file (the best is reported)')
flags.DEFINE_string('files', '/tmp/scale_jax_media_decode', 'where the generated files are kept')
FLAGS = flags.FLAGS

VIDEOS = {  # name: x264 options
    'keyframe every 1 s, no B-frames': {'g': '30', 'bf': '0'},
    'keyframe every 2 s, B-frames': {'g': '60', 'bf': '3'},
    'x264 defaults (keyframe every 250 frames at most)': {},
}


def _picture(t: int, height: int, width: int, rng) -> np.ndarray:
  """Frame t of a moving colour pattern under 8 x 8 block noise, uint8 [height, width, 3]."""
  y, x = np.mgrid[0:height, 0:width]
  img = np.stack([(x + 7 * t) % 256, (y + 3 * t) % 256, ((x + y) // 4 + t) % 256], -1)
  noise = rng.normal(0, 6, (height // 8, width // 8, 1)).repeat(8, 0).repeat(8, 1)
  return np.clip(img + noise, 0, 255).astype(np.uint8)


def _video(options: dict, seconds=14, fps=30, height=720, width=1280) -> bytes:
  rng = np.random.default_rng(0)
  buf = io.BytesIO()
  with av.open(buf, 'w', format='mp4') as container:
    stream = container.add_stream('libx264', rate=fps)
    stream.height, stream.width, stream.pix_fmt = height, width, 'yuv420p'
    stream.options = {'preset': 'veryfast', 'crf': '23', **options}
    for t in range(seconds * fps):
      frame = av.VideoFrame.from_ndarray(_picture(t, height, width, rng), format='rgb24')
      container.mux(stream.encode(frame))
    container.mux(stream.encode())
  return buf.getvalue()


def _audio(seconds=60, rate=44100) -> bytes:
  t = np.arange(seconds * rate) / rate
  wave = 0.3 * np.stack([np.sin(2 * np.pi * 440 * t), np.sin(2 * np.pi * 660 * t)], -1)
  buf = io.BytesIO()
  soundfile.write(buf, wave, rate, format='WAV', subtype='PCM_16')
  return buf.getvalue()


def _image(size=800) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(_picture(0, size, size, np.random.default_rng(0))).save(buf, 'JPEG', quality=90)
  return buf.getvalue()


def files(directory: str) -> dict:
  """{name: bytes} of the files, generated into `directory` the first time."""
  os.makedirs(directory, exist_ok=True)
  makers = {f'video, {name}': (lambda o=options: _video(o)) for name, options in VIDEOS.items()}
  makers.update({'audio, 60 s 44.1 kHz stereo WAV': _audio, 'image, 800 px JPEG': _image})
  out = {}
  for i, (name, make) in enumerate(makers.items()):
    path = os.path.join(directory, f'{i}.bin')
    if not os.path.exists(path):
      print(f'generating {name} ...', flush=True)
      with open(path + '.part', 'wb') as f:
        f.write(make())
      os.replace(path + '.part', path)
    with open(path, 'rb') as f:
      out[name] = f.read()
  return out


def main(argv):
  del argv
  config = FLAGS.config
  v, a, i = config.video, config.audio, config.image
  decoders = {
      'video': lambda d: media.decode_video(d, v.num_frames, v.frame_size, v.fps),
      'audio': lambda d: media.decode_audio(d, a.sample_rate, a.seconds),
      'image': lambda d: media.decode_image(d, i.size),
  }
  print(f'{config_flags.get_config_filename(FLAGS["config"])}: video {v.num_frames} frames at '
        f'{v.fps} fps, {v.frame_size} px; audio {a.seconds} s at {a.sample_rate} Hz; image '
        f'{i.size} px. Load average before: {os.getloadavg()[0]:.2f}', flush=True)
  for name, data in files(FLAGS.files).items():
    decode = decoders[name.split(',')[0]]
    times = []
    for _ in range(FLAGS.repeats):
      start = time.perf_counter()
      decode(data)
      times.append(time.perf_counter() - start)
    print(f'{name} ({len(data) / 1e6:.2f} MB): best {1e3 * min(times):.1f} ms, median '
          f'{1e3 * float(np.median(times)):.1f} ms', flush=True)
  print(f'load average after: {os.getloadavg()[0]:.2f}')


if __name__ == '__main__':
  app.run(main)
