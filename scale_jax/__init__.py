"""scale_jax: SCALE (M5Product, CVPR 2022) multi-modal contrastive pretraining in JAX/Flax."""

# The five modalities of a product, in the fixed order used by every array with a modality axis
# (presence masks, harmonized weight matrices, the joint token sequence).
MODALITIES = ('text', 'table', 'image', 'video', 'audio')
