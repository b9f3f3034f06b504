"""scale_jax: SCALE (M5Product, CVPR 2022) multi-modal contrastive pretraining in JAX/Flax."""

# The five modalities of a product, in the fixed order used by every array with a modality axis
# (presence masks, harmonized weight matrices, the joint token sequence).
MODALITIES = ('text', 'table', 'image', 'video', 'audio')


def active_modalities(config) -> tuple:
  """The modalities a config trains on (`config.modalities`), checked and in canonical order."""
  chosen = tuple(config.modalities)
  unknown = set(chosen) - set(MODALITIES)
  if unknown or not chosen:
    raise ValueError(f'config.modalities={chosen}: choose from {MODALITIES}')
  return tuple(m for m in MODALITIES if m in chosen)
