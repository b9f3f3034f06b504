r"""configs/large.py on two 8-GPU H100 nodes (80 GB each): FSDP over the 8 GPUs of a node (NVLink),
data parallel across the two nodes (dcn_data=2: only the gradient all-reduce crosses the network).

    sbatch --nodes=2 launch/slurm_gpu.sbatch --config configs/pods/h100_2x8.py --workdir RUN

Only a GPU compiles for a GPU: check memory with one step on a node (the trainer logs the
compiled step), not with scale_jax.aot here.
"""
from configs import large


def get_config():
  c = large.get_config()
  c.batch_size = 1024
  c.mesh.update(data=2, fsdp=8, tensor=1, dcn_data=2)
  return c
