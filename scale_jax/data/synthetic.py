r"""Writes a synthetic product catalogue in the raw layout of docs/data.md.

    python -m scale_jax.data.synthetic --out DIR --num-products N --seed S

Every modality carries part of the category and nothing carries all of it: each modality shows
the category only through its own coarse grouping (6 groups per modality, drawn per modality), so
a single modality cannot tell apart categories that share its group, while the combination of
modalities can. Each modality also carries strong nuisance that varies from listing to listing
(background colours, a louder tone at a random pitch, filler words and properties), so raw-input
similarity says little about the category: what the modalities share is what pretraining has to
find. Listings of the same physical product (instance) share instance details (brand word, logo
colour, tremolo), categories are long-tailed (Zipf), some captions belong to another product, and
modalities go missing at the paper's rates.
"""
import argparse
import dataclasses
import io
import json
import os

import av
import numpy as np
import soundfile
import tqdm
from PIL import Image

GROUPS = 6  # groups per modality: a modality alone narrows a category down to one of these
IMAGE_SIZE = 64
VIDEO_SIZE = 48
VIDEO_FRAMES = 8
VIDEO_FPS = 2
AUDIO_RATE = 16000
AUDIO_SECONDS = 2.0

_GROUP_WORDS = [  # caption words for each text group
    ['cotton', 'linen', 'knit'], ['leather', 'wallet', 'stitched'], ['ceramic', 'mug', 'glazed'],
    ['steel', 'knife', 'forged'], ['wooden', 'desk', 'oak'], ['plastic', 'toy', 'bright']]
_MATERIALS = ['silk', 'nylon', 'glass', 'bamboo', 'copper', 'rubber']  # table value per group
# Nuisance: varies from listing to listing, unrelated to the category.
_FILLER = ['new', 'hot', 'sale', 'free', 'shipping', 'best', 'quality', 'gift', 'official',
           'store', '2022', 'style', 'limited', 'offer', 'deal', 'fast', 'delivery', 'premium',
           'classic', 'fashion', 'genuine', 'discount', 'trendy', 'popular', 'value', 'pack',
           '新款', '包邮', '正品', '热卖', '特价', '爆款', '促销', '精选']
_NUISANCE_TABLE = {'colour': ['red', 'blue', 'black', 'white', 'green', 'grey', 'pink', 'beige'],
                   'origin': ['guangdong', 'zhejiang', 'jiangsu', 'fujian', 'shandong', 'hebei'],
                   'season': ['spring', 'summer', 'autumn', 'winter', 'all-season'],
                   'size': ['S', 'M', 'L', 'XL', 'one-size']}
_PITCHES = [220.0, 330.0, 440.0, 587.0, 740.0, 988.0]  # Hz, one per audio group
MODALITY_FIELDS = ('caption', 'tabular', 'image', 'video', 'audio')


@dataclasses.dataclass(frozen=True)
class Instance:
  """One physical product; its listings share category and these details."""
  index: int
  category: int
  brand: str
  logo_xy: tuple[int, int]
  logo_colour: np.ndarray
  tremolo_hz: float


def make_catalogue(num_products, seed, num_categories=None):
  """Returns (instances, listings, group maps); a listing is (instance, rng seed)."""
  rng = np.random.default_rng(seed)
  num_categories = num_categories or max(4, min(50, num_products // 60))
  # group[m, c]: the group of category c as seen by modality m (m indexes MODALITY_FIELDS).
  groups = np.stack([rng.permutation(np.arange(num_categories) % GROUPS)
                     for _ in MODALITY_FIELDS])
  zipf = 1.0 / np.arange(1, num_categories + 1) ** 0.8
  num_instances = max(1, num_products // 3)
  instances = [
      Instance(index=i, category=int(rng.choice(num_categories, p=zipf / zipf.sum())),
               brand='brand' + ''.join(rng.choice(list('abcdefghjkmnpqrstuvwxyz'), 4)),
               logo_xy=tuple(int(v) for v in rng.integers(4, IMAGE_SIZE - 16, 2)),
               logo_colour=rng.integers(0, 255, 3).astype(np.float32),
               tremolo_hz=float(rng.uniform(1.0, 6.0)))
      for i in range(num_instances)]
  listings = [instances[int(i)] for i in rng.integers(0, num_instances, num_products)]
  return listings, groups, num_categories


def _caption(inst, groups, rng):
  words = [rng.choice(_GROUP_WORDS[groups[0, inst.category]]), inst.brand]
  words += list(rng.choice(_FILLER, rng.integers(4, 9)))
  rng.shuffle(words)
  return ' '.join(words)


def _table(inst, groups, rng):
  pairs = [('material', _MATERIALS[groups[1, inst.category]]), ('brand', inst.brand)]
  for key in rng.choice(list(_NUISANCE_TABLE), rng.integers(1, 4), replace=False):
    pairs.append((key, str(rng.choice(_NUISANCE_TABLE[key]))))
  rng.shuffle(pairs)
  return '#;#'.join(f'{k}#:#{v}' for k, v in pairs)  # the official M5Product table string


def _image(inst, groups, rng):
  """Stripes whose orientation and period give the image group, over a random background."""
  group = groups[2, inst.category]
  yy, xx = np.mgrid[:IMAGE_SIZE, :IMAGE_SIZE].astype(np.float32)
  coordinate = (yy, xx, xx + yy)[group % 3]
  period = (8.0, 16.0)[group // 3]
  stripes = np.sin(2 * np.pi * coordinate / period + rng.uniform(0, 2 * np.pi))
  img = rng.uniform(40, 215, 3) + 40.0 * stripes[..., None]
  x, y = inst.logo_xy
  img[y:y + 12, x:x + 12] = inst.logo_colour
  img += rng.normal(0, 20, img.shape)
  buf = io.BytesIO()
  Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format='JPEG', quality=90)
  return buf.getvalue()


def _video(inst, groups, rng):
  """A bar in the instance's colour sweeping over a random background; its direction and speed
  give the video group."""
  group = groups[3, inst.category]
  horizontal, speed = group % 2 == 0, 2 + 3 * (group // 2)
  frames = np.tile(rng.uniform(20, 235, 3).astype(np.float32),
                   (VIDEO_FRAMES, VIDEO_SIZE, VIDEO_SIZE, 1))
  start = rng.integers(0, VIDEO_SIZE)
  for t in range(VIDEO_FRAMES):
    pos = (start + speed * t) % (VIDEO_SIZE - 8)
    if horizontal:
      frames[t, :, pos:pos + 8] = inst.logo_colour
    else:
      frames[t, pos:pos + 8, :] = inst.logo_colour
  frames += rng.normal(0, 12, frames.shape)
  return encode_mp4(np.clip(frames, 0, 255).astype(np.uint8), VIDEO_FPS)


def encode_mp4(frames, fps, audio=None, sample_rate=AUDIO_RATE):
  """H.264 in MP4 from uint8 frames [T, H, W, 3], with an AAC sound track if `audio` (a mono
  float waveform in [-1, 1]) is given."""
  buf = io.BytesIO()
  with av.open(buf, 'w', format='mp4') as container:
    stream = container.add_stream('libx264', rate=fps)
    stream.height, stream.width = frames.shape[1:3]
    stream.pix_fmt = 'yuv420p'
    stream.options = {'preset': 'ultrafast', 'crf': '20'}
    sound = None
    if audio is not None:
      sound = container.add_stream('aac', rate=sample_rate, layout='mono')
    for frame in frames:
      container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format='rgb24')))
    container.mux(stream.encode())
    if sound is not None:
      samples = np.asarray(audio, np.float32)[None]  # planar float, one channel
      chunk = sound.codec_context.frame_size or 1024
      for start in range(0, samples.shape[1], chunk):
        piece = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples[:, start:start + chunk]),
                                           format='fltp', layout='mono')
        piece.sample_rate = sample_rate
        container.mux(sound.encode(piece))
      container.mux(sound.encode())
  return buf.getvalue()


def _audio(inst, groups, rng):
  """A tone at the group's pitch with the instance's tremolo, under a louder tone at a random
  pitch, in noise."""
  t = np.arange(int(AUDIO_RATE * AUDIO_SECONDS)) / AUDIO_RATE
  pitch = _PITCHES[groups[4, inst.category]] * rng.uniform(0.98, 1.02)
  tremolo = 0.6 + 0.4 * np.sin(2 * np.pi * inst.tremolo_hz * t)
  wave = (0.15 * tremolo * np.sin(2 * np.pi * pitch * t)
          + 0.3 * np.sin(2 * np.pi * rng.uniform(150, 3000) * t) + rng.normal(0, 0.05, t.shape))
  buf = io.BytesIO()
  soundfile.write(buf, wave.astype(np.float32), AUDIO_RATE, format='WAV', subtype='PCM_16')
  return buf.getvalue()


def _present_modalities(rng):
  """About 80% of products have all five, 15% miss some, 5% have exactly one (paper rates)."""
  u, n = rng.random(), len(MODALITY_FIELDS)
  if u < 0.05:
    keep = {int(rng.integers(n))}
  elif u < 0.20:
    keep = set(rng.choice(n, int(rng.integers(2, n)), replace=False).tolist())
  else:
    keep = set(range(n))
  return [m in keep for m in range(n)]


def _noise(field, rng):
  """Content for a modality that carries nothing: neither category nor instance (the noise
  study of the ablations: is a useless modality down-weighted?)."""
  if field == 'caption':
    return ' '.join(rng.choice(_FILLER, rng.integers(6, 11)))
  if field == 'tabular':
    keys = rng.choice(list(_NUISANCE_TABLE), rng.integers(2, 5), replace=False)
    return '#;#'.join(f'{k}#:#{rng.choice(_NUISANCE_TABLE[k])}' for k in keys)
  if field == 'image':
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)).save(
        buf, format='JPEG', quality=90)
    return buf.getvalue()
  if field == 'video':
    return encode_mp4(rng.integers(0, 256, (VIDEO_FRAMES, VIDEO_SIZE, VIDEO_SIZE, 3),
                                   dtype=np.uint8), VIDEO_FPS)
  buf = io.BytesIO()
  soundfile.write(buf, rng.normal(0, 0.2, int(AUDIO_RATE * AUDIO_SECONDS)).astype(np.float32),
                  AUDIO_RATE, format='WAV', subtype='PCM_16')
  return buf.getvalue()


def write_catalogue(out, num_products, seed, mismatch_rate=0.05, progress=True,
                    noise_modality=None):
  """Writes DIR/manifest.jsonl and the media files under DIR/{images,videos,audio}.

  noise_modality (a field of MODALITY_FIELDS): the same catalogue, product for product, with
  that modality replaced by noise that carries neither category nor instance."""
  if noise_modality is not None and noise_modality not in MODALITY_FIELDS:
    raise ValueError(f'noise_modality={noise_modality!r}: one of {", ".join(MODALITY_FIELDS)}')
  listings, groups, num_categories = make_catalogue(num_products, seed)
  for sub in ('images', 'videos', 'audio'):
    os.makedirs(os.path.join(out, sub), exist_ok=True)
  rng = np.random.default_rng(seed + 1)
  captions = [_caption(inst, groups, rng) for inst in listings]
  with open(os.path.join(out, 'manifest.jsonl'), 'w', encoding='utf-8') as manifest:
    for i, inst in enumerate(tqdm.tqdm(listings, desc='synthetic products', disable=not progress)):
      item_id = f'p{i:06d}'
      present = _present_modalities(rng)
      caption = captions[i]
      if rng.random() < mismatch_rate:  # merchants' captions are sometimes another product's
        caption = captions[int(rng.integers(num_products))]
      record = {'item_id': item_id, 'caption': caption, 'tabular': _table(inst, groups, rng),
                'image': None, 'video': None, 'audio': None,
                'label': inst.category, 'instance_id': inst.index}
      # The noise has a stream of its own: every other modality is the clean catalogue's.
      noise_rng = np.random.default_rng([seed, 7, i])
      if noise_modality in ('caption', 'tabular'):
        record[noise_modality] = _noise(noise_modality, noise_rng)
      for field, make, ext in (('image', _image, 'images/{}.jpg'),
                               ('video', _video, 'videos/{}.mp4'),
                               ('audio', _audio, 'audio/{}.wav')):
        rel = ext.format(item_id)
        data = make(inst, groups, rng)
        with open(os.path.join(out, rel), 'wb') as f:
          f.write(_noise(field, noise_rng) if field == noise_modality else data)
        record[field] = rel
      for field, keep in zip(MODALITY_FIELDS, present):
        if not keep:
          record[field] = None
      manifest.write(json.dumps(record, ensure_ascii=False) + '\n')
  return num_categories


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', required=True, help='directory to write the raw layout into')
  parser.add_argument('--num-products', type=int, default=3000)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--noise-modality', choices=MODALITY_FIELDS, default=None,
                      help='replace this modality by noise (the same products otherwise)')
  args = parser.parse_args(argv)
  num_categories = write_catalogue(args.out, args.num_products, args.seed,
                                   noise_modality=args.noise_modality)
  print(f'wrote {args.num_products} products in {num_categories} categories to {args.out}')


if __name__ == '__main__':
  main()
