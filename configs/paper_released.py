r"""SCALE at the sizes of the authors' released code, for like-for-like speed comparisons with it
(docs/benchmarks.md): the paper's widths and depths, with the released code's structure.

    python benchmarks/train_step.py --config configs/paper_released.py --config.batch_size=16

Against configs/paper.py:
- text and table share one encoder, image and video share another (model.share_*);
- the image, video and audio encoders are narrower: 8 heads and MLP width 1024, where the text
  encoder and the joint co-transformer keep 12 heads and 3072 (model.media_*);
- a 21128-token vocabulary (the Chinese BERT vocabulary the authors tokenise with);
- pre-extracted features, in the authors' token shapes: 36 image regions of 2048 values (Faster
  R-CNN), 12 video clips of 1024 (S3D), 80 mel bands of 751 frames for audio;
- the released code's behaviours: masked heads on the per-modality encoders, absent modalities as
  zero vectors, no modality-type embedding, and gradient through the harmonized weights (the
  joint co-transformer's only way to the loss once the heads read the encoders).
Kept from configs/paper.py: the layers scanned and rematerialised with remat='dots' (each block
keeps its matmul outputs and recomputes the rest), so batch 64 in float32 needs 9.1 GB of XLA
buffers where unscanned it needs 20 GB (the authors' code: 22 GB), and a step at batch 16 is
1.04x (f32) and 1.14x (bf16) faster on the CPU (docs/benchmarks.md); unscanned, remat alone
saves nothing on the CPU (XLA:CPU's scheduler may run the recomputation early, so the
activations stay live). Also kept: the MLM/MEM logits at the masked tokens only
(text/table.max_masked);
--config.text.max_masked=0 --config.table.max_masked=0 decode every position, the authors' FLOPs
(1888 GFLOP per step at batch 16 by model_info's formula, theirs 1897; 1785 with the limits).
Training on M5Product in this form needs a dataset built with those feature arrays
(docs/data.md); the benchmark needs none (random inputs of these shapes).
"""
from configs import paper


def get_config():
  c = paper.get_config()
  c.image.update(source='features', feature_tokens=36, feature_dim=2048)
  c.video.update(source='features', feature_tokens=12, feature_dim=1024)
  c.audio.update(source='features', feature_tokens=80, feature_dim=751)
  c.model.update(vocab_size=21128, share_text_table=True, share_image_video=True,
                 media_heads=8, media_mlp_dim=1024, masked_heads_on='encoder', absent='zero',
                 type_embedding=False, stop_gradient_weights=False)
  return c
