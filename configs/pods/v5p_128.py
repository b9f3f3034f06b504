r"""configs/large.py on a TPU v5p-128 slice (64 chips of 95 GiB): FSDP over 16 chips, 4 data-
parallel copies (FSDP's all-gathers stay within a group of 16), blocks rematerialised ('dots').

    python -m scale_jax.aot --config configs/pods/v5p_128.py       # fits? (docs/scaling.md)
"""
from configs import large


def get_config():
  c = large.get_config()
  c.batch_size = 4096
  c.mesh.update(data=4, fsdp=16, tensor=1)
  c.pod = dict(topology='v5p:4x4x4', slices=1)
  return c
