r"""Where a train step's time goes, op by op: our compiled step (XLA's trace events mapped to the
optimised HLO) and, with --peer open_clip, open_clip's step at the same dimensions
(torch.profiler), in the same groups, one after the other on this machine.

    python benchmarks/op_profile.py --config configs/clip_peer.py [--config.x=y ...] [--steps 3]
        [--peer open_clip [--peer_autocast bfloat16]] [--top 12]

Groups: matmuls (forward; backward dx and dW), the attention core (scores, mask, softmax and
their gradients; torch: its fused SDPA kernels), layout copies (transposes and copies XLA or torch
writes between ops), LayerNorm, GELU and the residual adds, the optimizer and the update, and the
rest (embeddings, biases, loss). Each row is milliseconds of wall time per step: XLA runs
independent ops at the same time, so where k ops run at once each is given 1/k of that time
(torch runs one op at a time, each on all cores: its rows are the ops' self times, which the
profiler's own cost per op inflates: compare its wall time with vs_open_clip.py's). XLA's plain
dot ops (its Eigen path) run asynchronously: their trace events end when the dot is queued, so
their time shows in the row of time when no op was traced, and they get no GFLOP/s of their own.
The matmul rows and the per-shape table give GFLOP/s from the shapes (work over the op's share of
the wall time), to compare with the machine's 2048^3 ceiling, measured here too.
--peer needs the peers extra (pip install -e '.[peers]'). Each side's ceiling is in the dtype of
its matmuls: bf16 for --config.model.matmul=bf16_operands (or a bf16 model.dtype) and for
--peer_autocast bfloat16 (open_clip under torch.autocast). Record results, with the machine, in
docs/benchmarks.md.
"""
import collections
import glob
import math
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
from absl import app, flags
from ml_collections import config_flags

from benchmarks import timing
from scale_jax import cli
from scale_jax.train import matmul_dtype

config_flags.DEFINE_config_file('config', 'configs/clip_peer.py', 'config file (configs/*.py)',
                                lock_config=True)
flags.DEFINE_integer('steps', 3, 'profiled steps (after one unprofiled warm-up)')
flags.DEFINE_enum('peer', None, ['open_clip'], 'also profile this peer\'s step')
flags.DEFINE_integer('top', 12, 'rows of the per-shape matmul table')
flags.DEFINE_enum('peer_autocast', None, ['bfloat16'], 'run the peer\'s forward and loss under '
                  'torch.autocast in this dtype (default: plain f32)')

GROUPS = ('matmul forward', 'matmul backward dx', 'matmul backward dW', 'attention core',
          'layout copies', 'LayerNorm', 'GELU and residual', 'optimizer and update', 'the rest')
_MOVES = {'transpose', 'copy', 'bitcast', 'reshape', 'broadcast', 'slice', 'concatenate', 'pad',
          'dynamic-slice', 'dynamic-update-slice', 'parameter', 'constant', 'tuple',
          'get-tuple-element', 'reverse'}
_INSTRUCTION = re.compile(r'^\s*(?:ROOT )?%([\w.\-]+) = (.+?) ([a-z][\w\-]*)\((.*)$')
_COMPUTATION = re.compile(r'^(?:ENTRY )?%([\w.\-]+) ')


def _dims(shape: str):
  m = re.match(r'\w+\[([\d,]*)\]', shape)
  return [int(d) for d in m.group(1).split(',') if d] if m else None


class Hlo:
  """The optimised HLO module as instructions: opcode, shape, operands, op_name and callees."""

  def __init__(self, text):
    self.instructions, self.computations = {}, collections.defaultdict(list)
    computation = None
    for line in text.splitlines():
      m = _INSTRUCTION.match(line)
      if m is None:
        c = _COMPUTATION.match(line)
        computation = c.group(1) if c and line.rstrip().endswith('{') else computation
        continue
      name, shape, opcode, rest = m.groups()
      op_name = re.search(r'op_name="([^"]*)"', rest)
      self.instructions[name] = dict(
          opcode=opcode, dims=_dims(shape), rest=rest,
          operands=re.findall(r'%([\w.\-]+)', rest.split('),')[0]),
          calls=re.findall(r'(?:calls|to_apply|body|condition)=%([\w.\-]+)', rest),
          op_name=op_name.group(1).split(';')[0] if op_name else '')
      self.computations[computation].append(name)
    # A fusion whose root XLA made itself (e.g. bf16_operands' transposed copies) has no op_name:
    # name it after the last named op it runs, so that it is grouped by what it computes.
    for name, i in self.instructions.items():
      if not i['op_name'] and i['calls']:
        i['op_name'] = next((self.instructions[n]['op_name'] for n in reversed(self.inner(name))
                             if self.instructions[n]['op_name']), '')

  def inner(self, name):
    """The instructions a (fusion) instruction runs, itself included."""
    out, todo = [name], list(self.instructions[name]['calls'])
    while todo:
      for n in self.computations[todo.pop()]:
        out.append(n)
        todo += self.instructions[n]['calls']
    return out

  def dot_sizes(self, name):
    """(contracted elements, output elements) of a dot, from its shapes."""
    i = self.instructions[name]
    lhs = self.instructions[i['operands'][0]]['dims']
    contracting = re.search(r'lhs_contracting_dims=\{([\d,]*)\}', i['rest'])
    k = math.prod(lhs[int(d)] for d in contracting.group(1).split(',') if d) if contracting else 1
    return k, math.prod(i['dims'])

  def moves_only(self, name):
    """Whether an instruction (a fusion: with what it runs, nested fusions included) only moves
    data, and copies or transposes some: a layout copy."""
    opcodes = {self.instructions[n]['opcode'] for n in self.inner(name)} - {'fusion'}
    return opcodes <= _MOVES and bool(opcodes & {'transpose', 'copy'})

  def dot_flops(self, name):
    k, n = self.dot_sizes(name)
    return 2 * k * n

  def dot_shape(self, name):
    i = self.instructions[name]
    return ' x '.join(str(self.instructions[o]['dims']) for o in i['operands'][:2])


def classify(op_name: str, has_dot: bool, moves_only: bool, is_kernel_grad: bool) -> str:
  """The group of one of our ops, from its jax op_name (e.g. 'jit(train_step)/transpose(jvp(
  Scale))/encoders_image/block_0/mlp_in/dot_general') and what it computes."""
  backward = 'transpose(' in op_name
  in_model = 'jvp(' in op_name
  # Attention's own ops: everything under attention/ but its two projections.
  attention_core = '/attention/' in op_name and not re.search(r'/attention/(qkv|out)/', op_name)
  if has_dot and in_model and not attention_core:
    return ('matmul backward dW' if is_kernel_grad else 'matmul backward dx') if backward \
        else 'matmul forward'
  if moves_only:
    return 'layout copies'
  if attention_core:
    return 'attention core'
  if re.search(r'/ln_\w+/', op_name):
    return 'LayerNorm'
  if re.search(r'/block_\d+/[^/]+$', op_name) or re.search(r'/blocks/[^/]+$', op_name):
    return 'GELU and residual'
  if not in_model:
    return 'optimizer and update'
  return 'the rest'


def wall_shares(intervals):
  """Each op's share of the wall time, in ms, from (start_ns, end_ns, op) intervals: XLA runs
  independent ops at the same time (one per core), so a stretch of time where k ops run counts
  1/k to each. Also the busy time (at least one op running)."""
  edges = sorted([(start, 1, op) for start, _, op in intervals] +
                 [(end, -1, op) for _, end, op in intervals], key=lambda e: (e[0], e[1]))
  shares, running, busy, last = collections.Counter(), collections.Counter(), 0.0, None
  for t, change, op in edges:
    if running and last is not None:
      dt = (t - last) / 1e6
      busy += dt
      for o, n in running.items():
        shares[o] += dt * n / sum(running.values())
    running[op] += change
    if running[op] <= 0:
      del running[op]
    last = t
  return shares, busy


def layer_kernel_sizes(params):
  """The element counts of one layer's kernels: what a kernel gradient's dot outputs. A scanned
  stack ('blocks') has the layers on a leading axis."""
  sizes = set()
  for path, x in jax.tree_util.tree_leaves_with_path(params):
    scanned = any(getattr(k, 'key', None) == 'blocks' for k in path)
    if x.ndim >= 2 + scanned:
      sizes.add(x.size // x.shape[0] if scanned else x.size)
  return sizes


def profile_ours(config, steps):
  compiled, state, batch, _, _ = timing.compile_step(config)
  hlo = Hlo(compiled.as_text())
  kernel_sizes = layer_kernel_sizes(state.params)
  trace_dir = tempfile.mkdtemp(prefix='op_profile_')
  jax.profiler.start_trace(trace_dir)
  t = time.perf_counter()
  _, state = timing.time_steps(compiled, state, batch, steps)
  wall = (time.perf_counter() - t) / steps
  jax.profiler.stop_trace()
  [path] = glob.glob(f'{trace_dir}/**/*.xplane.pb', recursive=True)
  intervals = []
  for plane in jax.profiler.ProfileData.from_file(path).planes:
    for line in plane.lines:
      for event in line.events:
        op = dict(event.stats).get('hlo_op')
        if op in hlo.instructions and hlo.instructions[op]['opcode'] not in (
            'while', 'call', 'conditional'):  # those contain other ops' events
          intervals.append((event.start_ns, event.end_ns, op))
  durations, busy_ms = wall_shares(intervals)
  durations = {op: ms / steps for op, ms in durations.items()}
  runs = collections.Counter(op for _, _, op in intervals)  # an op in a loop runs several times
  groups = collections.Counter()
  shapes = collections.defaultdict(lambda: [0.0, 0.0])  # ms, flops per step
  group_flops = collections.Counter()
  async_flops = 0
  for op, ms in durations.items():
    inner = hlo.inner(op)
    dots = [n for n in inner if hlo.instructions[n]['opcode'] == 'dot']
    i = hlo.instructions[op]
    # A backward matmul is a kernel's gradient (dW) when its output is kernel-sized.
    group = classify(i['op_name'], bool(dots), hlo.moves_only(op),
                     bool(dots) and hlo.dot_sizes(dots[0])[1] in kernel_sizes)
    groups[group] += ms
    if i['opcode'] == 'dot':  # asynchronous (see the docstring): its event does not time it
      async_flops += hlo.dot_flops(op) * runs[op] / steps
    elif dots:
      f = sum(hlo.dot_flops(d) for d in dots) * runs[op] / steps
      group_flops[group] += f
      row = shapes[(group, ', '.join(hlo.dot_shape(d) for d in dots))]
      row[0] += ms
      row[1] += f
  return dict(groups=groups, group_flops=group_flops, shapes=shapes, wall_ms=1e3 * wall,
              busy_ms=busy_ms / steps,
              async_flops=async_flops)


def profile_open_clip(config, steps, autocast=None):
  # pylint: disable-next=import-outside-toplevel
  from benchmarks.open_clip_peer import open_clip_step, torch
  torch.set_num_threads(os.cpu_count())
  step, model = open_clip_step(config, autocast)
  kernel_sizes = {p.numel() for p in model.parameters() if p.ndim >= 2}
  step()  # warm-up
  with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                              record_shapes=True, with_flops=True) as prof:
    t = time.perf_counter()
    for _ in range(steps):
      step()
    wall = (time.perf_counter() - t) / steps
  groups = collections.Counter()
  group_flops = collections.Counter()
  shapes = collections.defaultdict(lambda: [0.0, 0.0])  # ms, flops per step
  for e in prof.events():
    if e.self_cpu_time_total <= 0:  # self time: an op's children are counted on their own
      continue
    chain, p = [e.name], e.cpu_parent
    while p is not None:
      chain.append(p.name)
      p = p.cpu_parent
    group = classify_torch(e.name, chain, e.input_shapes, kernel_sizes)
    ms = e.self_cpu_time_total / 1e3 / steps
    groups[group] += ms
    if group.startswith('matmul') and e.flops:
      group_flops[group] += e.flops / steps
      row = shapes[(group, ' x '.join(str(list(x)) for x in e.input_shapes[:3] if x))]
      row[0] += ms
      row[1] += e.flops / steps
  return dict(groups=groups, group_flops=group_flops, shapes=shapes, wall_ms=1e3 * wall)


def classify_torch(name, chain, input_shapes, kernel_sizes):
  """The group of a torch op from its name, the names above it (autograd's backward nodes,
  the optimizer's record_function) and its input shapes."""
  text = ' '.join(chain).lower()
  if 'optimizer.' in text:
    return 'optimizer and update'
  backward = 'backward' in text
  if name in ('aten::mm', 'aten::addmm', 'aten::bmm', 'aten::baddbmm') and 'attention' not in text:
    if not backward:
      return 'matmul forward'
    lhs, rhs = [s for s in input_shapes if len(s) >= 2][-2:]
    dw = lhs[-2] * rhs[-1] in kernel_sizes  # the output is a weight's size
    return 'matmul backward dW' if dw else 'matmul backward dx'
  if 'attention' in text or 'softmax' in text:
    return 'attention core'
  if name in ('aten::copy_', 'aten::clone', 'aten::contiguous'):
    return 'layout copies'
  if 'layer_norm' in text:
    return 'LayerNorm'
  if 'gelu' in text or (name == 'aten::add' and not backward):
    return 'GELU and residual'
  return 'the rest'


def report(name, result, ceiling_gflops, top):
  groups, flops = result['groups'], result['group_flops']
  total = sum(groups.values())
  print(f'\n{name}: step wall time {result["wall_ms"]:.0f} ms, of which ops ran '
        f'{result.get("busy_ms", total):.0f} ms; the rows sum to {total:.0f} ms')
  print('| group | ms per step | of the wall time | GFLOP/s |')
  print('|---|---|---|---|')
  wall = result['wall_ms']
  for g in GROUPS:
    if g in groups:
      rate = f'{flops[g] / groups[g] / 1e6:.0f}' if flops.get(g) else ''
      print(f'| {g} | {groups[g]:.0f} | {100 * groups[g] / wall:.0f}% | {rate} |')
  if 'busy_ms' in result:
    # XLA's plain dot ops (the Eigen path, e.g. a dW in a form YNNPACK does not take) run
    # asynchronously: their trace event ends when the dot is queued, so their time is here.
    untraced, async_flops = wall - total, result['async_flops']
    rate = (f'{async_flops / untraced / 1e6:.0f} if all of it were those dots'
            if async_flops and untraced > 0 else '')
    print(f'| no op traced (asynchronous Eigen dots, {async_flops / 1e9:.1f} GFLOP; idle) | '
          f'{untraced:.0f} | {100 * untraced / wall:.0f}% | {rate} |')
  matmul_flops = sum(flops[g] for g in flops if g.startswith('matmul')) + result.get(
      'async_flops', 0)
  print(f'matmuls: {matmul_flops / 1e9:.1f} GFLOP per step; at the 2048^3 ceiling '
        f'({ceiling_gflops:.0f} GFLOP/s) they alone would take '
        f'{matmul_flops / 1e6 / ceiling_gflops:.0f} ms')
  print(f'\nits {top} most costly matmul shapes:')
  print('| group | operand shapes | ms per step | GFLOP/s |')
  print('|---|---|---|---|')
  for (g, shape), (ms, f) in sorted(result['shapes'].items(), key=lambda kv: -kv[1][0])[:top]:
    print(f'| {g} | {shape} | {ms:.1f} | {f / ms / 1e6:.0f} |')


def main(argv):
  del argv
  f = flags.FLAGS
  dtype = matmul_dtype(f.config)
  ceiling = 1e3 * timing.matmul_ceiling_tflops(dtype)
  ours = profile_ours(f.config, f.steps)
  report(f'ours (XLA, matmuls in {dtype}; XLA_FLAGS {timing.xla_flags()}; allocator '
         f'{timing.allocator()})', ours, ceiling, f.top)
  if f.peer == 'open_clip':
    # pylint: disable-next=import-outside-toplevel
    from benchmarks.open_clip_peer import torch, torch_ceiling_tflops
    report(f'open_clip (torch {torch.__version__}, '
           f'{"autocast " + f.peer_autocast if f.peer_autocast else "float32"})',
           profile_open_clip(f.config, f.steps, f.peer_autocast),
           1e3 * torch_ceiling_tflops(f.peer_autocast or 'float32'), f.top)


if __name__ == '__main__':
  # A failed config check in one line, not a traceback; a misspelt override named.
  app.run(cli.user_errors_in_one_line(main), flags_parser=cli.parse_flags)
