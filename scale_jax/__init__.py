"""scale_jax: SCALE (M5Product, CVPR 2022) multi-modal contrastive pretraining in JAX/Flax."""
