r"""configs/large.py on a TPU v4-32 slice (16 chips of 32 GiB, each one device: JAX runs a v4
chip's two TensorCores as one): parameters and Adam moments sharded over all 16 (FSDP), blocks
rematerialised ('dots').

    python -m scale_jax.aot --config configs/pods/v4_32.py       # fits? (docs/scaling.md)
    launch/tpu_vm.sh run configs/pods/v4_32.py gs://BUCKET/runs/v4_32 --config.data.dir=/mnt/m5p
"""
from configs import large


def get_config():
  c = large.get_config()
  c.batch_size = 1024
  c.mesh.update(data=1, fsdp=16, tensor=1)
  c.pod = dict(topology='v4:2x2x4', slices=1)  # what scale_jax.aot compiles for
  return c
