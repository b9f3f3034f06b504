r"""Our clip_peer train step against open_clip's at the same dimensions, side by side in one run
on this machine, each against its own library's matmul ceiling measured in the same run.

    pip install -e '.[peers]'    # open_clip and torch; never part of make demo or make test
    python benchmarks/vs_open_clip.py [--config configs/clip_peer.py] [--config.x=y ...]
        [--steps 5] [--rounds 4] [--threads N] [--peer_autocast bfloat16]

Both steps: a two-tower CLIP with the config's dimensions (image size and patch, text length and
vocabulary, width, depth, heads, MLP width, embedding), the symmetric InfoNCE loss with a learned
temperature, AdamW, the config's batch, f32, random inputs (no input pipeline). The two are timed
in alternating rounds of --steps steps, so that a change in the machine's load hits both alike.
Each round's ceiling is a 2048^3 f32 matmul, best of 5, in XLA and in torch. The report: median
seconds per step each, our speed-up over open_clip, and each step's FLOP rate (XLA's count of our
compiled step, the same math for both) as a fraction of both ceilings. The last line is
`speedup <open_clip s/step / ours>`. Record results, with the machine, in docs/benchmarks.md.

Mixed precision, like for like: `--config.model.matmul=bf16_operands` (our Dense matmuls on bf16
copies, f32 accumulation) against `--peer_autocast bfloat16` (open_clip's forward and loss under
torch.autocast, which does the same to its matmuls). Either one adds a bf16 2048^3 ceiling per
library to the rounds and the report.
"""
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
from absl import app, flags
from ml_collections import config_flags

from benchmarks import open_clip_peer
from benchmarks import timing as ours
from benchmarks.open_clip_peer import open_clip, torch
from scale_jax import cli
from scale_jax.train import matmul_dtype

config_flags.DEFINE_config_file('config', 'configs/clip_peer.py', 'config file (configs/*.py)',
                                lock_config=True)
flags.DEFINE_integer('steps', 5, 'timed steps per side and round')
flags.DEFINE_integer('rounds', 4, 'alternating rounds')
flags.DEFINE_integer('threads', 0, 'torch threads (0: the number of cores, as XLA uses)')
flags.DEFINE_enum('peer_autocast', None, ['bfloat16'], 'run open_clip\'s forward and loss under '
                  'torch.autocast in this dtype (default: plain f32)')


def main(argv):
  del argv
  f = flags.FLAGS
  config = f.config
  torch.set_num_threads(f.threads or os.cpu_count())
  compiled, state, batch, flops, compile_s = ours.compile_step(config)
  theirs, their_model = open_clip_peer.open_clip_step(config, f.peer_autocast)
  dtypes = ['float32'] + sorted({matmul_dtype(config), f.peer_autocast or 'float32'} - {'float32'})
  their_params = sum(p.numel() for p in their_model.parameters())
  theirs()  # warm-up
  our_params = sum(x.size for x in jax.tree.leaves(state.params))
  print(f'parameters: ours {our_params / 1e6:.2f} M, open_clip {their_params / 1e6:.2f} M; '
        f'our step compiled in {compile_s:.1f} s, {flops / 1e9:.1f} GFLOP per step (XLA count)',
        flush=True)
  times = {'ours': [], 'open_clip': []}
  ceilings = {(lib, d): [] for lib in ('xla', 'torch') for d in dtypes}
  for i in range(f.rounds):
    for d in dtypes:
      ceilings['xla', d].append(ours.matmul_ceiling_tflops(d))
      ceilings['torch', d].append(open_clip_peer.torch_ceiling_tflops(d))
    t, state = ours.time_steps(compiled, state, batch, f.steps)
    times['ours'] += t
    their = []
    for _ in range(f.steps):
      t0 = time.perf_counter()
      theirs()
      their.append(time.perf_counter() - t0)
    times['open_clip'] += their
    now = ', '.join(f'{lib} {d} {1e3 * v[-1]:.0f}' for (lib, d), v in ceilings.items())
    print(f'round {i + 1}: ours {statistics.median(t):.3f} s/step, open_clip '
          f'{statistics.median(their):.3f}; ceilings (GFLOP/s) {now}', flush=True)
  best = {k: 1e3 * max(v) for k, v in ceilings.items()}
  median = {k: statistics.median(v) for k, v in times.items()}
  print(f'{config_flags.get_config_filename(f["config"])} batch {config.batch_size}, matmul '
        f'ours {config.model.matmul}, open_clip '
        f'{"autocast " + f.peer_autocast if f.peer_autocast else "float32"}; '
        f'{os.cpu_count()} cores, torch {torch.__version__}, open_clip {open_clip.__version__}; '
        'matmul ceilings (2048^3, best of the rounds, GFLOP/s): '
        + ', '.join(f'{lib} {d} {v:.0f}' for (lib, d), v in best.items())
        + f'; XLA_FLAGS {ours.xla_flags()}; allocator {ours.allocator()}')
  for name, seconds in median.items():
    rate = flops / 1e9 / seconds
    fractions = ', '.join(f'{100 * rate / v:.0f}% of {lib} {d}' for (lib, d), v in best.items())
    print(f'{name}: {seconds:.3f} s/step (median of {len(times[name])}), '
          f'{config.batch_size / seconds:.1f} examples/s, {rate:.0f} GFLOP/s = {fractions}')
  print(f'speedup {median["open_clip"] / median["ours"]:.3f}')


if __name__ == '__main__':
  # A failed config check in one line, not a traceback; a misspelt override named.
  app.run(cli.user_errors_in_one_line(main), flags_parser=cli.parse_flags)
