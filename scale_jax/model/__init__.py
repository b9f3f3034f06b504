"""SCALE in Flax linen."""
