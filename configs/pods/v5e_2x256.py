r"""configs/pods/v5e_256.py on two v5e-256 slices (multislice): data parallel across the slices
over the data-centre network (dcn_data=2), FSDP within each slice, so parameter all-gathers never
leave a slice and only the gradient all-reduce crosses DCN.

    python -m scale_jax.aot --config configs/pods/v5e_2x256.py     # fits? (docs/scaling.md)
"""
from configs.pods import v5e_256


def get_config():
  c = v5e_256.get_config()
  c.batch_size = 8192
  c.eval.batch_size = 1024  # a multiple of the 512 devices
  c.mesh.update(data=2, fsdp=256, tensor=1, dcn_data=2)
  c.pod = dict(topology='v5e:16x16', slices=2)
  return c
