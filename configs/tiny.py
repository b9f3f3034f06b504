"""The demo config shrunk to test size: a few seconds per step-compile on the CPU. Tests use it."""
from configs import demo


def get_config():
  c = demo.get_config()
  c.batch_size = 8
  c.total_steps = 4
  c.log_every = 1
  c.checkpoint_every = 2
  c.data.read_threads = 1
  c.text.max_len = 12
  c.table.max_len = 16
  c.image.update(size=16, patch=8)
  c.video.update(num_frames=2, frame_size=4)
  c.audio.update(seconds=0.5, n_mels=16, patch_time=8, patch_freq=8)  # 30 frames -> 24 used
  c.model.update(vocab_size=512, width=32, heads=2, mlp_dim=64, encoder_layers=1, joint_layers=1,
                 embed_dim=16)
  c.optimizer.warmup_steps = 2
  c.eval.update(batch_size=16, train_products=64)
  c.evals.probe.steps = 50
  c.evals.finetune.steps = 4
  return c
