"""The main image: resized, scaled to [-1, 1], cut into patches; masked region modelling (MRM)."""
import numpy as np

from scale_jax.modalities.base import PatchModality, divides, patchify


class Image(PatchModality):
  name, field, objective = 'image', 'image', 'mrm'

  def media_positions(self, c):
    return (c['size'] // c['patch']) ** 2

  def media_patch_dim(self, c):
    return c['patch'] ** 2 * 3

  def preprocess_media(self, ex, present, c):
    from scale_jax.data import media  # pylint: disable=g-import-not-at-top  (decoders: data only)
    img = np.zeros((c['size'], c['size'], 3), np.float32)
    if present:
      img = media.decode_image(ex['image'], c['size']) * 2 - 1
    patches = patchify(img, c['patch'], c['patch'])
    return {'image_input': patches, 'image_valid': np.full(len(patches), present)}

  def check_bytes(self, data):
    from scale_jax.data import media  # pylint: disable=g-import-not-at-top
    media.decode_image(data, 8)

  def check_media(self, c):
    return divides(c, 'image', 'patch', 'size')


IMAGE = Image()
