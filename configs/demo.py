r"""The README demo: a small SCALE pretrained on the synthetic catalogue on the CPU.

    make demo
    # or, step by step:
    python -m scale_jax.data.synthetic --out demo_out/raw --num-products 3000 --seed 0
    python -m scale_jax.data.build --raw demo_out/raw --out demo_out/data
    python -m scale_jax.train --config configs/demo.py --workdir demo_out/run
    python -m scale_jax.evaluate --workdir demo_out/run

About 4 minutes of training on 2 CPU cores; pretrained features beat the same model at random
initialisation on retrieval mAP and linear-probe accuracy (docs/benchmarks.md has the figures).
Every field is overridable: --config.model.width=256 --config.total_steps=2000 ...
"""
import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.batch_size = 64  # global, over all processes and devices
  c.total_steps = 300
  c.log_every = 20
  c.checkpoint_every = 100
  c.checkpoint_keep = 2  # the latest N checkpoints are kept ...
  c.checkpoint_keep_every = 0  # ... plus every one at a multiple of this step (0: none)
  # Split each global batch into this many microbatches, GradCache-style (docs/training.md): the
  # update equals the whole batch's, activation memory falls to about one microbatch's.
  c.microbatches = 1
  # Multi-process runs agree on a preemption notice (SIGTERM) every this many steps.
  c.preemption_check_every = 10
  # Where a run without a checkpoint of its own starts: another run's latest checkpoint, only the
  # parameters whose path ('encoders_text/block_0/mlp_in/kernel') the regex `include` finds.
  c.init_from = dict(workdir='', include='.*')
  # MFU's denominator: peak TFLOP/s of one device at the compute dtype (H100 SXM bf16 dense 989,
  # TPU v4 275, v5e 197); 0 = measure a large matmul at start (achievable, below the datasheet).
  c.peak_tflops_per_device = 0.0
  # A profiler trace of `steps` steps from step `start` into RUN/tensorboard (0 steps: off).
  c.profile = dict(start=0, steps=0)

  c.data = dict(
      dir='demo_out/data',  # written by scale_jax.data.build
      num_workers=0,  # Grain worker processes; -1 = auto
      read_threads=2,  # decode threads inside each process
      prefetch=128,  # examples read ahead
      cache_mb=256,  # decoded products kept in memory per process (the demo's take ~80 MB)
      # Train only on products that have every one of config.modalities (an ablation: the paper
      # trains on incomplete products too). Evaluation always reads every usable product.
      complete_only=False,
  )

  # Per-modality preprocessing. Paper sizes: text 36 tokens, table 64, image 36 regions, video 12
  # frames at 1 fps, audio 12 s at 16 kHz with n_fft 1024 / hop 256 / 80 mel bands.
  # A modality whose masked objective is off (its config.loss coefficient or mask_rate 0) is seen
  # clean: neither masked nor corrupted.
  # max_masked: at most this many masked tokens per product (a random subset of more), and the
  # head decodes only those (BERT's max_predictions_per_seq); 0 decodes every position.
  c.text = dict(max_len=16, mask_rate=0.15, max_masked=0)
  # mask_unit: 'entity' masks whole keys or values (the paper's MEM), 'token' word pieces (MLM's).
  c.table = dict(max_len=32, mask_rate=0.15, mask_unit='entity', max_masked=0)
  # source='features' reads the product's pre-extracted `{m}_features` array (docs/data.md)
  # instead of decoding media: its first feature_tokens rows of feature_dim values each.
  features = dict(source='media', feature_tokens=0, feature_dim=0)
  c.image = dict(size=32, patch=8, mask_rate=0.15, **features)
  c.video = dict(num_frames=4, frame_size=12, fps=1.0, mask_rate=0.15, **features)
  # Audio: the spectrogram frames of `seconds` (124 here), down to a multiple of patch_time (112),
  # in patch_time x patch_freq patches (7 x 2 = 14 tokens). Padding of a shorter clip is invalid.
  c.audio = dict(sample_rate=16000, seconds=2.0, n_fft=512, hop=256, n_mels=32,
                 patch_time=16, patch_freq=16, mask_rate=0.15, **features)

  c.modalities = ('text', 'table', 'image', 'video', 'audio')  # any subset, e.g. ('text', 'image')
  c.model = dict(
      vocab_size=1024,  # >= the tokenizer's vocabulary
      width=128, heads=4, mlp_dim=512,
      encoder_layers=2,  # per modality
      share_text_table=False,  # one encoder for text and table (the released code shares it)
      share_image_video=False,  # one encoder for image and video frames (likewise)
      # The image, video and audio encoders' heads and MLP width; 0: heads and mlp_dim (the
      # released code's media encoders: 8 heads, MLP 1024).
      media_heads=0, media_mlp_dim=0,
      joint_layers=2,  # the joint co-transformer over all modalities' tokens; 0 = no fusion
      type_embedding=True,  # modality-type embedding in the joint co-transformer
      absent='mask',  # absent modalities: 'mask' out of attention, or 'zero' (released code)
      masked_heads_on='joint',  # masked objectives read 'joint' outputs (paper) or 'encoder' ones
      embed_dim=128,  # contrastive projection
      contrastive='infonce',  # or 'nt_xent' (SimCLR: same-modality negatives too; released code)
      temperature=0.07, learn_temperature=False,
      weighting='harmonized',  # 'harmonized', 'learned' (score matrix), 'uniform' or 'none'
      stop_gradient_weights=True,  # the weights carry no gradient into the embeddings
      dtype='float32',  # compute dtype ('bfloat16' on TPU/GPU); parameters stay float32
      remat='none',  # per block: 'none', 'full' (recompute all) or 'dots' (keep matmul outputs)
      scan_layers=False,  # one compiled block per encoder, parameters stacked (faster compile)
      # Dense layers' matmuls: 'float32', 'float32_direct_dw' (the kernel gradient in one dot,
      # without transposed copies; faster on one Intel Xeon only) or 'bf16_operands' (bf16
      # inputs, f32 accumulation, f32 parameters and gradients; faster on CPUs with AVX512_BF16
      # or AMX only).
      # Choose per machine with benchmarks/train_step.py --matmul (docs/benchmarks.md).
      matmul='float32',
      # The attention core: 'jax' (jax.nn.dot_product_attention) or 'heads_major' (the same
      # arithmetic with the heads axis before the tokens; fewer layout copies on XLA:CPU, faster
      # on AMD Zen 5 and not yet timed on Intel). Choose per machine with benchmarks/train_step.py
      # --compare "model.attention='heads_major'" (docs/benchmarks.md).
      attention='jax',
  )
  # Coefficient of each objective in the total loss.
  c.loss = dict(contrastive=1.0, mlm=1.0, mem=1.0, mrm=1.0, mfp=1.0, mam=1.0)

  c.optimizer = dict(lr=1e-3, warmup_steps=30, decay='cosine', weight_decay=0.05, b1=0.9, b2=0.98,
                     clip_norm=1.0,
                     # ((regex, multiplier), ...) on parameter paths, the first match wins; e.g.
                     # (('^(encoders_text|token_embed)/', 0.1),) trains the text tower at 0.1 x lr.
                     lr_multipliers=())
  # Device mesh; -1 takes the devices left over. Logical-axis rules live in scale_jax/sharding.py.
  # dcn_*: how many of an axis's positions lie in different slices or hosts (across the
  # data-centre network); e.g. data=4, fsdp=64, dcn_data=4 on four 64-chip slices keeps FSDP's
  # all-gathers within a slice. tensor must stay within a host.
  c.mesh = dict(data=-1, fsdp=1, tensor=1, dcn_data=1, dcn_fsdp=1, dcn_tensor=1)

  # Evaluation (docs/evaluation.md). The product feature of a modality combination: the
  # 'fused' vectors (or the pre-fusion 'z') of its modalities, 'mean'- (or 'sum'-) pooled; the
  # product encoded from those modalities 'only' (or from all of them, 'full': the authors').
  c.eval = dict(
      batch_size=128,  # products per evaluation batch (splits over the data x fsdp devices)
      # Each modality alone, then the paper's ladder: text, +image, +table, +video, +audio.
      combinations=('text', 'table', 'image', 'video', 'audio', 'text+image', 'text+table+image',
                    'text+table+image+video', 'text+table+image+video+audio'),
      feature='fused', pooling='mean', protocol='only',
      train_products=1000,  # the train-split sample the probe and fine-tuning learn from
  )
  # The evaluators, by name: `type` picks the module (scale_jax/evaluators/), the rest are its
  # settings. The trainer runs each every `every` steps (0: never) on the validation split;
  # `python -m scale_jax.evaluate --workdir RUN` runs them all on the test split.
  c.evals = dict(
      # queries / gallery: files of item ids, one per line (M5Product's lists), restricting who
      # asks and who may be found; '' for every product of the split.
      coarse=dict(type='retrieval', relevance='category', every=0, queries='', gallery=''),
      fine=dict(type='retrieval', relevance='instance', every=0, queries='', gallery=''),
      probe=dict(type='classification', method='probe', steps=500, lr=0.01, every=0),
      # Fine-tuning trains the encoders: on the CPU the demo fine-tunes the full combination only.
      finetune=dict(type='classification', method='finetune', steps=60, lr=1e-4, every=0,
                    combinations=('all',)),
      clustering=dict(type='clustering', every=0),
  )
  return c
