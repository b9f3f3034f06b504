r"""configs/large.py on a TPU v5e-256 slice (256 chips of 16 GiB): FSDP over all 256, blocks
rematerialised in full (16 GiB per chip leaves little room for activations).

    python -m scale_jax.aot --config configs/pods/v5e_256.py       # fits? (docs/scaling.md)
"""
from configs import large


def get_config():
  c = large.get_config()
  c.batch_size = 4096
  c.mesh.update(data=1, fsdp=256, tensor=1)
  c.model.remat = 'full'
  c.eval.batch_size = 1024  # a multiple of the 256 devices
  c.pod = dict(topology='v5e:16x16', slices=1)
  return c
