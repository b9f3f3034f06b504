"""open_clip's two-tower CLIP step at a config's dimensions, and torch's matmul ceiling: the peer
that benchmarks/vs_open_clip.py and op_profile.py measure us against. Needs the peers extra."""
import sys
import time

try:
  import open_clip
  import torch
except ImportError as e:
  sys.exit(f'{e}: this benchmark needs the peers extra: pip install -e \'.[peers]\'')


def open_clip_step(config, autocast=None):
  """open_clip's CLIP at the config's dimensions, with its ClipLoss and AdamW: a step function,
  and the model. With `autocast` (a dtype name: 'bfloat16'), the forward and loss run under
  torch.autocast: torch's own mixed precision, matmuls on bf16 copies, weights and optimizer f32."""
  m = config.model
  if m.width % m.heads:
    raise ValueError(f'config.model.width={m.width} does not split into {m.heads} heads')
  model = open_clip.CLIP(
      embed_dim=m.embed_dim,
      vision_cfg=dict(image_size=config.image.size, patch_size=config.image.patch, width=m.width,
                      layers=m.encoder_layers, head_width=m.width // m.heads,
                      mlp_ratio=m.mlp_dim / m.width),
      text_cfg=dict(context_length=config.text.max_len, vocab_size=m.vocab_size, width=m.width,
                    heads=m.heads, layers=m.encoder_layers, mlp_ratio=m.mlp_dim / m.width),
      output_dict=True)
  o = config.optimizer
  optimizer = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=(o.b1, o.b2),
                                weight_decay=o.weight_decay)
  loss_fn = open_clip.ClipLoss()
  gen = torch.Generator().manual_seed(0)
  images = torch.randn(config.batch_size, 3, config.image.size, config.image.size, generator=gen)
  texts = torch.randint(0, m.vocab_size, (config.batch_size, config.text.max_len), generator=gen)
  model.train()
  autocast_dtype = getattr(torch, autocast) if autocast else None

  def step():
    with torch.autocast('cpu', dtype=autocast_dtype, enabled=autocast_dtype is not None):
      out = model(images, texts)
      loss = loss_fn(out['image_features'], out['text_features'], out['logit_scale'])
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()  # waits for the step, as block_until_ready does on our side

  return step, model


def torch_ceiling_tflops(dtype='float32', n=2048, repeats=5) -> float:
  a = torch.ones(n, n, dtype=getattr(torch, dtype))
  a @ a
  best = float('inf')
  for _ in range(repeats):
    t = time.perf_counter()
    a @ a
    best = min(best, time.perf_counter() - t)
  return 2 * n ** 3 / best / 1e12
