r"""A two-tower CLIP built from SCALE's parts, for a side-by-side speed comparison with open_clip
at equal dimensions: image and text only, no fusion, no masked objectives, no harmonized weights.

    python benchmarks/train_step.py --config configs/clip_peer.py

Image 64 px in 8 px patches (64 + 1 tokens), text 32 tokens from an 8192-token vocabulary, both
towers 6 layers x 256 wide x 4 heads, embedding 256, learned temperature, batch 128, AdamW.
"""
from configs import demo


def get_config():
  c = demo.get_config()
  c.modalities = ('text', 'image')
  c.batch_size = 128
  c.text.max_len = 32
  c.image.update(size=64, patch=8)
  c.model.update(vocab_size=8192, width=256, heads=4, mlp_dim=1024, encoder_layers=6,
                 joint_layers=0, type_embedding=False, embed_dim=256, learn_temperature=True,
                 weighting='none')
  c.loss.update(mlm=0.0, mem=0.0, mrm=0.0, mfp=0.0, mam=0.0)
  c.optimizer.update(lr=5e-4, warmup_steps=100, weight_decay=0.2)
  return c
