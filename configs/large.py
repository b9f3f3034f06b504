r"""A pod-scale SCALE, ViT-L class towers: 12-layer per-modality encoders and a 12-layer joint
co-transformer, width 1024, 16 heads; images at 224 px in 16 px patches (196 + 1 tokens).

    launch/tpu_vm.sh run configs/large.py gs://BUCKET/runs/large --config.data.dir=/mnt/m5p

Parameters and Adam moments are sharded over all devices (FSDP), blocks rematerialised and scanned.
Check memory per device before booking a pod (CPU compiler's figures, minutes to compile):
    python -m scale_jax.aot --config configs/large.py --mesh data=1,fsdp=16,tensor=1
"""
from configs import paper


def get_config():
  c = paper.get_config()
  c.batch_size = 4096
  c.total_steps = 80_000  # ~50 epochs of 6.3M products
  c.image.update(size=224, patch=16)
  c.model.update(width=1024, heads=16, mlp_dim=4096, encoder_layers=12, joint_layers=12,
                 embed_dim=512, remat='dots', scan_layers=True)
  c.optimizer.update(lr=1e-3, warmup_steps=4_000, decay='cosine', weight_decay=0.05)
  c.mesh.update(data=1, fsdp=-1, tensor=1)
  return c
