import json
import os

import numpy as np

from scale_jax.data import media, synthetic


def test_missing_modality_rates_match_the_paper():
  rng = np.random.default_rng(0)
  present = np.array([synthetic._present_modalities(rng) for _ in range(20000)])
  counts = present.sum(1)
  assert counts.min() >= 1
  assert abs(np.mean(counts < 5) - 0.20) < 0.015  # ~20% miss at least one modality
  assert abs(np.mean(counts == 1) - 0.05) < 0.01  # ~5% have a single one


def test_catalogue_layout_and_media(raw_dir):
  with open(os.path.join(raw_dir, 'manifest.jsonl'), encoding='utf-8') as f:
    records = [json.loads(line) for line in f]
  assert len(records) == 96
  fields = {'item_id', 'caption', 'tabular', 'image', 'video', 'audio', 'label', 'instance_id'}
  assert all(set(r) == fields for r in records)
  r = next(r for r in records if r['image'] and r['video'] and r['audio'])
  with open(os.path.join(raw_dir, r['image']), 'rb') as f:
    assert media.decode_image(f.read(), 16).shape == (16, 16, 3)
  with open(os.path.join(raw_dir, r['video']), 'rb') as f:
    frames, count = media.decode_video(f.read(), 12, 8, fps=1.0)
  # 8 frames at 2 fps = 4 s: about one frame a second gives 4.
  assert count == synthetic.VIDEO_FRAMES // synthetic.VIDEO_FPS
  with open(os.path.join(raw_dir, r['audio']), 'rb') as f:
    assert media.decode_audio(f.read(), 16000, 1.0)[0].shape == (16000,)
  # Several listings per instance, all of the instance's category.
  by_instance = {}
  for r in records:
    by_instance.setdefault(r['instance_id'], set()).add(r['label'])
  assert len(by_instance) < len(records)
  assert all(len(labels) == 1 for labels in by_instance.values())


def test_each_modality_carries_part_of_the_category():
  _, groups, num_categories = synthetic.make_catalogue(3000, seed=0)
  for m in range(groups.shape[0]):  # one modality alone confuses categories...
    assert len(set(groups[m])) == synthetic.GROUPS < num_categories
  combined = {tuple(groups[:, c]) for c in range(num_categories)}  # ...all of them together less
  assert len(combined) > synthetic.GROUPS


def test_noise_modality_changes_that_modality_only(tmp_path):
  clean, noisy = tmp_path / 'clean', tmp_path / 'noisy'
  synthetic.write_catalogue(str(clean), num_products=12, seed=3, progress=False)
  synthetic.write_catalogue(str(noisy), num_products=12, seed=3, progress=False,
                            noise_modality='image')
  a = (clean / 'manifest.jsonl').read_text(encoding='utf-8')
  assert a == (noisy / 'manifest.jsonl').read_text(encoding='utf-8')  # same products, same paths
  for sub in ('videos', 'audio'):
    for f in (clean / sub).iterdir():
      assert f.read_bytes() == (noisy / sub / f.name).read_bytes()
  changed = [f.name for f in (clean / 'images').iterdir()
             if f.read_bytes() != (noisy / 'images' / f.name).read_bytes()]
  assert len(changed) == 12
  synthetic.write_catalogue(str(tmp_path / 'text'), num_products=12, seed=3, progress=False,
                            noise_modality='caption')
  captions = [json.loads(line)['caption']
              for line in (tmp_path / 'text' / 'manifest.jsonl').read_text().splitlines()]
  assert not any(c and 'brand' in c for c in captions)  # the instance's brand word is gone
