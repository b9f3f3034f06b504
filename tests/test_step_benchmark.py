"""benchmarks/train_step.py: one run timing a config on one device and on all four of the suite's
CPU devices, each against the one machine's matmul ceiling; and asking for more devices than
there are; an XLA option XLA rejects, a misspelt --compare, and a config its check rejects.
benchmarks/xla_flags.py: the same step under XLA_FLAGS settings and an environment setting, in
alternating processes; the allocator each run names."""
import os
import re
import subprocess
import sys

from benchmarks import timing
from scale_jax import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_benchmark(script, *args):
  """benchmarks/<script> with args, in the suite's environment (its XLA_FLAGS: four devices)."""
  return subprocess.run([sys.executable, f'benchmarks/{script}', *args], cwd=REPO,
                        env=dict(os.environ), capture_output=True, text=True, timeout=550)


def test_times_each_device_count_beside_the_other():
  proc = run_benchmark('train_step.py', '--config', 'configs/tiny.py', '--config.batch_size=8',
                       "--config.modalities=('text', 'image')", '--steps', '1', '--devices', '1,4')
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = proc.stdout
  ceiling = float(re.search(r'float32 (\d+) GFLOP/s before, (\d+) after', out).group(1))
  results = {}
  for m in re.finditer(r'\[(\d) devices?\] on (\d) x cpu: .* = ([0-9.]+)% of the measured '
                       r'float32 matmul ceiling \((\d+) GFLOP/s\); ([0-9.]+) GB of buffers( per '
                       r'device)?', out):
    assert m.group(1) == m.group(2)
    results[int(m.group(1))] = (float(m.group(4)), bool(m.group(6)))
  assert set(results) == {1, 4}, out
  # Both against the same machine ceiling (the larger of before and after), not 4x it.
  assert results[1][0] == results[4][0] >= ceiling
  assert not results[1][1] and results[4][1]  # XLA's buffers are per device
  assert re.search(r'^fastest here: float32 \[(1 device|4 devices)\]$', out, re.MULTILINE)
  assert f'XLA_FLAGS of this run: {os.environ["XLA_FLAGS"].strip()}\n' in out  # the suite's flags
  assert re.search(r'step_ms [0-9.]+\s*$', out)


def test_more_devices_than_the_process_has_says_how_to_get_them():
  proc = run_benchmark('train_step.py', '--config', 'configs/tiny.py', '--devices', '1,8')
  assert proc.returncode != 0
  assert 'this process has 4 device(s)' in proc.stderr
  assert 'XLA_FLAGS=--xla_force_host_platform_device_count=8' in proc.stderr


def test_a_compared_bf16_variant_is_held_to_the_bf16_ceiling():
  # The ceilings come from every variant's dtype, not only the base config's and --matmul's.
  proc = run_benchmark('train_step.py', '--config', 'configs/tiny.py',
                       '--config.model.dtype=float32', '--config.batch_size=8',
                       "--config.modalities=('text', 'image')", '--steps', '1', '--devices', '1',
                       '--compare', "model.matmul='bf16_operands'")
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = proc.stdout
  assert re.search(r'bfloat16 \d+ GFLOP/s before', out), out
  assert re.search(r"matmul float32 on 1 x cpu: .* of the measured float32 matmul ceiling", out)
  assert re.search(r"matmul bf16_operands, model.matmul='bf16_operands' on 1 x cpu: .* of the "
                   r'measured bfloat16 matmul ceiling', out), out


def test_an_xla_option_xla_rejects_is_a_usage_error_that_names_xla_flags():
  def run(option):
    return run_benchmark('train_step.py', '--config', 'configs/tiny.py', '--config.batch_size=8',
                         "--config.modalities=('text', 'image')", '--steps', '1', '--devices', '1',
                         '--xla_option', option)
  # XLA's option parser takes no '-' list syntax: that value only works through XLA_FLAGS.
  proc = run('xla_cpu_experimental_ynn_fusion_type=-individual_dot')
  assert proc.returncode != 0
  assert 'XLA rejected it' in proc.stderr and "'-individual_dot' is not a valid" in proc.stderr
  assert 'XLA_FLAGS=--KEY=VALUE' in proc.stderr
  assert 'Traceback' not in proc.stderr
  proc = run('xla_cpu_enable_fast_math')
  assert proc.returncode != 0
  assert "--xla_option 'xla_cpu_enable_fast_math': expected KEY=VALUE" in proc.stderr


def test_a_misspelt_or_unquoted_compare_is_a_usage_error():
  def run(overrides):
    return run_benchmark('train_step.py', '--config', 'configs/tiny.py', '--steps', '1',
                         '--compare', overrides)
  # Named in one line, not a traceback (the locked --config raised one from ml_collections).
  proc = run("model.matmull='bf16_operands'")
  assert proc.returncode != 0
  assert "no field 'matmull' in model" in proc.stderr and 'Traceback' not in proc.stderr
  proc = run('model.matmul=bf16_operands')
  assert proc.returncode != 0
  assert "'bf16_operands' is not a Python literal; quote a string" in proc.stderr


def test_a_config_the_check_rejects_is_one_error_line():
  # A quoted string override: ml_collections keeps the quotes, the config check names the field.
  proc = run_benchmark('train_step.py', '--config', 'configs/tiny.py', '--steps', '1',
                       "--config.model.dtype='float32'")
  assert proc.returncode == 1
  assert proc.stderr.startswith('error: the config cannot run:'), proc.stderr[-3000:]
  assert 'config.model.dtype="\'float32\'": one of float32, bfloat16' in proc.stderr
  assert 'Traceback' not in proc.stderr


def test_xla_flags_times_each_setting_in_its_own_process_on_top_of_the_callers_flags():
  eigen = '--xla_cpu_experimental_ynn_fusion_type=-individual_dot'
  proc = run_benchmark('xla_flags.py', '--variant', '', '--variant', eigen,
                       '--variant', 'MALLOC_ARENA_MAX=2', '--rounds', '1', '--',
                       '--config', 'configs/tiny.py', '--config.batch_size=8',
                       "--config.modalities=('text', 'image')", '--steps', '1', '--devices', '1')
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = proc.stdout
  # An environment word is set in the run's environment, not given to XLA (which would refuse
  # it); each run names its peak memory and its allocator, with glibc's settings.
  assert re.search(r"^round 1, MALLOC_ARENA_MAX=2, XLA_FLAGS \+ '': step_ms [0-9.]+ \(f32 "
                   r"ceiling \d+ GFLOP/s; peak memory [0-9.]+ GB; allocator glibc malloc "
                   r"MALLOC_ARENA_MAX=2; transparent huge pages: \w+; the run's XLA_FLAGS: ", out,
                   re.MULTILINE), out
  suite = os.environ['XLA_FLAGS'].strip()
  # Each run reports the flags it ran under: the suite's own, and the variant's after them.
  assert re.search(rf"^round 1, XLA_FLAGS \+ '': step_ms [0-9.]+ .*the run's XLA_FLAGS: "
                   rf'{re.escape(suite)}\)$', out, re.MULTILINE), out
  assert re.search(rf"^round 1, XLA_FLAGS \+ '{eigen}': step_ms [0-9.]+ .*the run's XLA_FLAGS: "
                   rf'{re.escape(suite + " " + eigen)}\)$', out, re.MULTILINE), out
  assert f'XLA_FLAGS of this process: {suite}\n' in out
  assert re.search(rf"^XLA_FLAGS \+ '{eigen}': .*x the first, faster in [01] of 1$", out,
                   re.MULTILINE), out
  assert re.search(r'^speedup [0-9.]+\s*$', out, re.MULTILINE)
  # A variant XLA cannot parse (first, so that no run before it is timed): the failed run is
  # named, with its error.
  proc = run_benchmark('xla_flags.py', '--variant', '--xla_no_such_flag=1', '--variant', '',
                       '--rounds', '1', '--', '--config', 'configs/tiny.py', '--steps', '1',
                       '--devices', '1')
  assert proc.returncode != 0
  assert 'train_step.py under XLA_FLAGS=' in proc.stderr and 'xla_no_such_flag' in proc.stderr


def test_the_allocator_is_named_from_the_preloaded_libraries(monkeypatch, tmp_path):
  thp = tmp_path / 'enabled'
  thp.write_text('always [madvise] never\n')
  monkeypatch.setattr(train, 'TRANSPARENT_HUGEPAGE', str(thp))
  monkeypatch.setenv('LD_PRELOAD', '/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4:/x/libz.so')
  assert timing.allocator() == 'libtcmalloc_minimal.so.4; transparent huge pages: madvise'
  monkeypatch.delenv('LD_PRELOAD')
  for name in [k for k in os.environ if k == 'GLIBC_TUNABLES' or k.startswith('MALLOC_')]:
    monkeypatch.delenv(name)  # glibc's settings of the machine running the suite
  assert timing.allocator() == 'glibc malloc; transparent huge pages: madvise'
  monkeypatch.setenv('GLIBC_TUNABLES', 'glibc.malloc.hugetlb=1')
  thp.write_text('[always] madvise never\n')
  assert timing.allocator() == ('glibc malloc GLIBC_TUNABLES=glibc.malloc.hugetlb=1; '
                                'transparent huge pages: always')
  thp.unlink()  # a kernel without transparent huge pages
  assert timing.allocator().endswith('; transparent huge pages: unknown')
