"""scale_jax: SCALE (M5Product, CVPR 2022) multi-modal contrastive pretraining in JAX/Flax."""
from scale_jax.modalities import MODALITIES  # TODO(refactor): import from scale_jax.modalities
from scale_jax.modalities import active as active_modalities
