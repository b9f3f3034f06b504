r"""SCALE at the paper's size: 6-layer per-modality encoders and a 6-layer joint co-transformer,
width 768; 231 joint tokens (text 36, table 64, image 36+1, video 12+1, audio 80+1).

    python -m scale_jax.train --config configs/paper.py --workdir RUN --config.data.dir=M5P_DATA

For M5Product built with `python -m scale_jax.data.build --raw M5P_RAW --out M5P_DATA
--vocab-size 32000`. The paper trained 5 to 10 epochs at batch 64 with Adam(W), lr 1e-4, 10%
linear warm-up then linear decay, on 1 to 4 GPUs; on a pod raise batch_size (and lr) and mesh.data.
Not reproduced: the paper started the text tower from BERT (at lr x 0.1); nothing is downloaded
here, so every tower starts from scratch. From a run whose text tower was trained already:
    --config.init_from.workdir=RUNS/text --config.init_from.include='^(encoders_text|token_embed)/'
    "--config.optimizer.lr_multipliers=(('^(encoders_text|token_embed)/', 0.1),)"
On this project's 2-core CPU one step at batch 16 takes seconds (docs/benchmarks.md).
"""
from configs import demo


def get_config():
  c = demo.get_config()
  c.batch_size = 64
  c.total_steps = 500_000  # ~5 epochs of 6.3M products at batch 64
  c.log_every = 100
  c.checkpoint_every = 5_000
  c.checkpoint_keep = 3
  c.data.update(num_workers=-1, read_threads=4, prefetch=512, cache_mb=0)  # 6.3M products
  c.text.max_len = 36
  c.table.max_len = 64
  # MLM/MEM logits over the 32000-token vocabulary at the masked tokens only, not at all 100
  # positions: about twice the expected count (15% of 34 word pieces; 15% of the pairs, one side
  # each), so under 1% of captions lose a masked token to the limit.
  c.text.max_masked = 12
  c.table.max_masked = 24
  c.image.update(size=192, patch=32)  # 6 x 6 = 36 patches (the paper's 36 regions)
  c.video.update(num_frames=12, frame_size=16, fps=1.0)  # 12 frames at 1 fps
  # 12 s at 16 kHz, n_fft 1024, hop 256, 80 mel bands: 747 frames (no centring), the first 740
  # cut into 10 x 8 patches of 74 frames x 10 bands: 80 audio tokens.
  c.audio.update(seconds=12.0, n_fft=1024, hop=256, n_mels=80, patch_time=74, patch_freq=10)
  # Scanned layers, each block keeping its matmul outputs and recomputing the rest: at batch 16
  # on the CPU 1.10x to 1.19x faster than unscanned (AMD Zen 3, Zen 4 and Zen 5), with 30% smaller
  # XLA buffers (docs/benchmarks.md). bf16 compute is for TPU and GPU: on a CPU, f32 is faster, and
  # model.matmul='bf16_operands' with f32 faster still where the CPU has AVX512_BF16.
  c.model.update(vocab_size=32000, width=768, heads=12, mlp_dim=3072, encoder_layers=6,
                 joint_layers=6, embed_dim=256, dtype='bfloat16', scan_layers=True,
                 remat='dots')
  c.optimizer.update(lr=1e-4, warmup_steps=50_000, decay='linear', weight_decay=0.01)
  return c
