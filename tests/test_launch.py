"""The launch scripts without a cloud or a cluster: `bash -n` for every script, the --dry-run
output of launch/tpu_vm.sh (the gcloud commands, exactly as they would run) and of
launch/slurm_gpu.sbatch (the srun command), the errors for missing settings, and the command
strings the TPU workers' shell would run, run here by bash against a fake repository and a fake
interpreter: install and update, start in the background, refuse a second start, SIGTERM and wait.
Nothing here needs gcloud, SLURM or the network."""
import glob
import os
import re
import shlex
import stat
import subprocess
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU_VM = os.path.join('launch', 'tpu_vm.sh')
SBATCH = os.path.join('launch', 'slurm_gpu.sbatch')
SETTINGS = {'TPU_NAME': 'pod-a', 'TPU_ZONE': 'us-west4-a', 'TPU_PROJECT': 'proj-1'}
# An override that a careless quote would split, expand or cut: spaces, both quotes, a $.
TRICKY = '--config.name=run \'one\' "two" $HOME'


def clean_env(**extra):
  """This environment without any setting the scripts read, plus `extra`."""
  env = {k: v for k, v in os.environ.items()
         if not (k.startswith(('TPU_', 'SLURM_')) or k in ('DRY_RUN', 'PYTHON', 'PORT'))}
  env.update(extra)
  return env


def bash(script, *args, env=None, cwd=REPO):
  return subprocess.run(['bash', script, *args], cwd=cwd, env=env or clean_env(),
                        capture_output=True, text=True, timeout=60)


def commands(stdout):
  """The printed commands ('+ ' lines), each as the argv a shell would make of it."""
  lines = stdout.splitlines()
  assert lines and all(line.startswith('+ ') for line in lines), stdout
  return [shlex.split(line[2:]) for line in lines]


def tpu(*args, **settings):
  result = bash(TPU_VM, '--dry-run', *args, env=clean_env(**{**SETTINGS, **settings}))
  assert result.returncode == 0, result.stderr
  return commands(result.stdout)


def worker_script(argv):
  """The --command string of a `gcloud compute tpus tpu-vm ssh` argv."""
  assert argv[:5] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh'], argv
  (script,) = [a[len('--command='):] for a in argv if a.startswith('--command=')]
  return script


def ssh_target(argv, worker='all'):
  assert argv[5] == 'pod-a'
  assert {'--zone=us-west4-a', '--project=proj-1', f'--worker={worker}'} <= set(argv), argv


def write_exe(path, text):
  with open(path, 'w', encoding='utf-8') as f:
    f.write(text)
  os.chmod(path, os.stat(path).st_mode | stat.S_IEXEC)
  return str(path)


# --------------------------------------------------------------------------------------------
# Every script parses.

@pytest.mark.parametrize('script', sorted(glob.glob(os.path.join(REPO, 'launch', '*.sh'))
                                      + glob.glob(os.path.join(REPO, 'launch', '*.sbatch'))),
                         ids=os.path.basename)
def test_bash_syntax(script):
  result = subprocess.run(['bash', '-n', script], capture_output=True, text=True)
  assert result.returncode == 0, result.stderr


def test_launch_scripts_named_where_they_are_documented():
  """launch/README.md lists every script, and every launch/X named in the docs exists."""
  with open(os.path.join(REPO, 'launch', 'README.md'), encoding='utf-8') as f:
    readme = f.read()
  for path in glob.glob(os.path.join(REPO, 'launch', '*')):
    if not path.endswith('README.md'):
      assert f'`{os.path.basename(path)}' in readme, os.path.basename(path)
  docs = (glob.glob(os.path.join(REPO, '*.md')) + glob.glob(os.path.join(REPO, 'docs', '*.md'))
          + glob.glob(os.path.join(REPO, 'configs', '*.py')) + [os.path.join(REPO, 'Makefile')])
  for doc in docs:
    with open(doc, encoding='utf-8') as f:
      for name in re.findall(r'launch/([\w.-]+\.(?:sh|sbatch))', f.read()):
        assert os.path.exists(os.path.join(REPO, 'launch', name)), (doc, name)


# --------------------------------------------------------------------------------------------
# tpu_vm.sh --dry-run: the gcloud commands.

def test_help_names_every_command_and_setting():
  result = bash(TPU_VM, '--help')
  assert result.returncode == 0 and result.stdout.startswith('usage:')
  for word in ('create', 'setup', 'run', 'tail', 'stop', 'delete', 'TPU_NAME', 'TPU_ZONE',
               'TPU_PROJECT', 'TPU_ACCELERATOR_TYPE', 'TPU_RUNTIME_VERSION', 'TPU_REPO_URL',
               'TPU_REPO_REF', 'TPU_EXTRAS', '--dry-run'):
    assert word in result.stdout, word


@pytest.mark.parametrize('accelerator,version', [
    ('v5litepod-16', 'v2-alpha-tpuv5-lite'), ('v5p-32', 'v2-alpha-tpuv5'),
    ('v6e-16', 'v2-alpha-tpuv6e'), ('v4-32', 'tpu-ubuntu2204-base')])
def test_create(accelerator, version):
  assert tpu('create', '--accelerator-type', accelerator) == [[
      'gcloud', 'compute', 'tpus', 'tpu-vm', 'create', 'pod-a', '--zone=us-west4-a',
      '--project=proj-1', f'--accelerator-type={accelerator}', f'--version={version}']]


def test_create_spot_preemptible_version_and_settings_from_env():
  (argv,) = tpu('create', '--spot', TPU_ACCELERATOR_TYPE='v5litepod-16',
                TPU_RUNTIME_VERSION='v2-alpha-tpuv5-lite')
  assert argv[-3:] == ['--accelerator-type=v5litepod-16', '--version=v2-alpha-tpuv5-lite',
                       '--spot']
  (argv,) = tpu('create', '--accelerator-type=v4-8', '--version=tpu-vm-base', TPU_PREEMPTIBLE='1')
  assert argv[-2:] == ['--version=tpu-vm-base', '--preemptible']
  # A flag beats its environment variable; without a project gcloud's default applies.
  (argv,) = tpu('create', '--zone', 'europe-west4-b', '--accelerator-type=v4-8', TPU_PROJECT='')
  assert '--zone=europe-west4-b' in argv and not any(a.startswith('--project') for a in argv)


def test_setup_copies_this_checkout_and_installs_the_extra():
  bundle_cmd, scp, rm, ssh = tpu('setup')
  assert bundle_cmd[:2] == ['git', '-C'] and bundle_cmd[3:5] == ['bundle', 'create']
  assert bundle_cmd[-1] == 'HEAD'
  bundle = bundle_cmd[5]
  assert scp[:5] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp']
  assert scp[5:7] == [bundle, 'pod-a:scale_jax.bundle']
  assert {'--zone=us-west4-a', '--project=proj-1', '--worker=all'} <= set(scp)
  assert rm == ['rm', '-f', bundle]
  ssh_target(ssh)
  script = worker_script(ssh)
  assert 'python3.11 -m venv .venv;' in script
  assert ".venv/bin/python -m pip install -q -e '.[tpu,gcs]';" in script
  assert 'git fetch -q "$HOME"/scale_jax.bundle HEAD;' in script


def test_setup_from_a_url_at_a_ref_with_other_extras():
  (ssh,) = tpu('setup', '--repo', 'https://github.com/org/scale_jax.git', '--ref', 'v1.2',
               '--python', '/opt/py/bin/python3.12', TPU_EXTRAS='tpu,test')
  ssh_target(ssh)
  script = worker_script(ssh)
  assert 'git fetch -q https://github.com/org/scale_jax.git v1.2;' in script
  assert "pip install -q -e '.[tpu,test]'" in script
  assert '/opt/py/bin/python3.12 -m venv .venv' in script


def test_run_command_on_every_worker():
  (ssh,) = tpu('run', '--env', 'JAX_COMPILATION_CACHE_DIR=gs://bkt/jax cache', 'configs/large.py',
               'gs://bkt/runs/r1', '--config.data.dir=gs://bkt/m5p', TRICKY)
  ssh_target(ssh)
  words = shlex.split(worker_script(ssh))
  start = words.index('nohup')
  assert words[start + 1:words.index('>>', start)] == [
      '.venv/bin/python', '-m', 'scale_jax.train', '--config', 'configs/large.py',
      '--workdir', 'gs://bkt/runs/r1', '--distributed', '--config.data.dir=gs://bkt/m5p', TRICKY]
  assert 'JAX_COMPILATION_CACHE_DIR=gs://bkt/jax cache;' in words


def test_tail_stop_delete():
  (ssh,) = tpu('tail')
  ssh_target(ssh, worker='0')
  assert worker_script(ssh) == 'tail -n 200 -F "$HOME"/scale_jax/logs/train.log'
  (ssh,) = tpu('tail', '--worker', '3', '--dir', 'other dir')
  ssh_target(ssh, worker='3')
  assert worker_script(ssh) == 'tail -n 200 -F "$HOME"/\'other dir\'/logs/train.log'
  (ssh,) = tpu('stop')
  ssh_target(ssh)
  assert 'kill -TERM "$pid"' in worker_script(ssh)
  assert tpu('delete') == [['gcloud', 'compute', 'tpus', 'tpu-vm', 'delete', 'pod-a',
                            '--zone=us-west4-a', '--project=proj-1']]
  assert tpu('delete', '--yes')[0][-1] == '--quiet'


@pytest.mark.parametrize('args,env,message', [
    (['stop'], {'TPU_NAME': ''}, ['--name', 'TPU_NAME']),
    (['setup'], {'TPU_ZONE': ''}, ['--zone', 'TPU_ZONE']),
    (['create'], {}, ['--accelerator-type', 'TPU_ACCELERATOR_TYPE']),
    (['create', '--accelerator-type=v9-8'], {}, ['--version', 'TPU_RUNTIME_VERSION']),
    (['create', '--accelerator-type=v4-8', '--spot', '--preemptible'], {}, ['--spot']),
    (['run', 'configs/large.py'], {}, ['CONFIG WORKDIR']),
    (['run', '--bogus', 'configs/large.py', 'gs://b/r'], {}, ['--bogus', 'after CONFIG WORKDIR']),
    (['run', '--env', 'not-a-name', 'c.py', 'gs://b/r'], {}, ['NAME=VALUE']),
    (['frob'], {}, ['frob']),
    (['stop', 'extra'], {}, ['extra']),
])
def test_missing_or_wrong_settings_name_what_to_give(args, env, message):
  result = bash(TPU_VM, '--dry-run', *args, env=clean_env(**{**SETTINGS, **env}))
  assert result.returncode == 2 and not result.stdout
  for word in message:
    assert word in result.stderr, (word, result.stderr)


# --------------------------------------------------------------------------------------------
# The workers' command strings, run here by bash in a fake home.

FAKE_PYTHON = """#!/usr/bin/env bash
# -c: the version check; -m venv DIR: a venv holding this file; anything else is logged.
case "$1" in
  -c) exit "${FAKE_TOO_OLD:-0}" ;;
  -m) if [ "$2" = venv ]; then mkdir -p "$3/bin" && cp "$0" "$3/bin/python"; fi ;;
esac
echo "$PWD|$*" >> "$HOME/calls.log"
"""

FAKE_TRAINER = """#!/usr/bin/env bash
# Records its argv and environment, then runs until a SIGTERM, as the trainer: save, exit 0.
printf '%s\\n' "$@" > "$HOME/argv.txt"
env > "$HOME/env.tmp" && mv "$HOME/env.tmp" "$HOME/env.txt"  # whole when it appears
trap 'echo "saved at the current step"; exit 0' TERM
echo training
while :; do sleep 0.05; done
"""


def on_worker(script, home, **env):
  return subprocess.run(['bash', '-c', script], cwd=home, capture_output=True, text=True,
                        timeout=60, env=clean_env(HOME=str(home), **env))


def git(*args, cwd):
  subprocess.run(['git', '-c', 'user.name=t', '-c', 'user.email=t@t', *args], cwd=cwd,
                 check=True, capture_output=True)


@pytest.mark.parametrize('source', ['url', 'bundle'])
def test_setup_script_installs_and_updates(tmp_path, source):
  src, home = tmp_path / 'src', tmp_path / 'home'
  src.mkdir()
  home.mkdir()
  git('init', '-q', '.', cwd=src)
  (src / 'setup.cfg').write_text('[metadata]\n')
  (src / 'old.py').write_text('')
  git('add', '.', cwd=src)
  git('commit', '-q', '-m', 'one', cwd=src)
  python = write_exe(tmp_path / 'python3.11', FAKE_PYTHON)
  args = ['setup', '--python', python, '--dir', 'work/scale_jax']
  if source == 'url':
    args += ['--repo', str(src)]

  def setup():
    if source == 'bundle':  # what the local half does: bundle, copy to the worker's home
      git('bundle', 'create', str(home / 'scale_jax.bundle'), 'HEAD', cwd=src)
    script = worker_script(tpu(*args)[-1])
    result = on_worker(script, home)
    assert result.returncode == 0, result.stderr
    return result

  setup()
  checkout = home / 'work' / 'scale_jax'
  assert (checkout / 'old.py').exists() and (checkout / '.venv' / 'bin' / 'python').exists()
  calls = (home / 'calls.log').read_text().splitlines()
  assert calls == [f'{checkout}|-m venv .venv', f'{checkout}|-m pip install -q --upgrade pip',
                   f'{checkout}|-m pip install -q -e .[tpu,gcs]']
  # A new commit: tracked files follow it, the venv stays (not made again).
  git('rm', '-q', 'old.py', cwd=src)
  git('commit', '-q', '-m', 'two', cwd=src)
  assert 'installed' in setup().stdout
  assert not (checkout / 'old.py').exists()
  assert sum('venv' in c for c in (home / 'calls.log').read_text().splitlines()) == 1
  head = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=src, capture_output=True, text=True)
  assert (subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=checkout, capture_output=True,
                         text=True).stdout == head.stdout)


def test_setup_script_wants_python_311(tmp_path):
  python = write_exe(tmp_path / 'python3', FAKE_PYTHON)
  script = worker_script(tpu('setup', '--repo', 'https://example.invalid/r.git', '--python',
                             python)[-1])
  result = on_worker(script, tmp_path, FAKE_TOO_OLD='1')
  assert result.returncode == 1
  assert 'older than 3.11' in result.stderr and '--python' in result.stderr
  assert not (tmp_path / 'scale_jax').exists()


def test_run_and_stop_scripts(tmp_path):
  home = tmp_path
  checkout = home / 'scale_jax'
  (checkout / '.venv' / 'bin').mkdir(parents=True)
  write_exe(checkout / '.venv' / 'bin' / 'python', FAKE_TRAINER)
  run = worker_script(tpu('run', '--env', 'JAX_COMPILATION_CACHE_DIR=gs://bkt/jax cache',
                          'configs/large.py', 'gs://bkt/runs/r1', TRICKY)[0])
  stop = worker_script(tpu('stop', '--timeout', '30')[0])
  pid = None
  try:
    result = on_worker(run, home)  # returns at once: the trainer runs on in the background
    assert result.returncode == 0, result.stderr
    assert 'started pid' in result.stdout
    pid = int((checkout / 'logs' / 'train.pid').read_text())
    deadline = time.time() + 30
    while not (home / 'env.txt').exists() and time.time() < deadline:
      time.sleep(0.05)
    assert (home / 'argv.txt').read_text().splitlines() == [
        '-m', 'scale_jax.train', '--config', 'configs/large.py', '--workdir', 'gs://bkt/runs/r1',
        '--distributed', TRICKY]
    assert 'JAX_COMPILATION_CACHE_DIR=gs://bkt/jax cache' in (home / 'env.txt').read_text()

    again = on_worker(run, home)
    assert again.returncode == 1 and 'already running' in again.stderr

    result = on_worker(stop, home)
    assert result.returncode == 0, result.stderr
    assert f'SIGTERM sent to {pid}' in result.stdout and 'stopped' in result.stdout
    log = (checkout / 'logs' / 'train.log').read_text()
    assert log.startswith('=== ') and 'training' in log and 'saved at the current step' in log
    assert 'not running' in on_worker(stop, home).stdout
  finally:
    if pid is not None:
      try:
        os.kill(pid, 9)
      except ProcessLookupError:
        pass


# --------------------------------------------------------------------------------------------
# slurm_gpu.sbatch --dry-run.

def sbatch(*args, **env):
  return bash(SBATCH, *args, env=clean_env(**env))


def test_sbatch_header():
  with open(os.path.join(REPO, SBATCH), encoding='utf-8') as f:
    header = [line.split()[1] for line in f if line.startswith('#SBATCH')]
  assert '--ntasks-per-node=1' in header and '--gpus-per-node=8' in header


@pytest.mark.parametrize('nodelist,host', [('gpu[003-004]', 'gpu003'),
                                           ('node7,node9', 'node7'), ('solo', 'solo')])
def test_sbatch_dry_run_srun_command(tmp_path, nodelist, host):
  trainer = write_exe(tmp_path / 'python', '#!/usr/bin/env bash\nprintf "%s\\n" "$@"\n')
  result = sbatch('--dry-run', 'configs/large.py', 'gs://bkt/runs/r1', TRICKY,
                  SLURM_JOB_NODELIST=nodelist, SLURM_NNODES='2', SLURM_NODEID='0',
                  SLURM_JOB_ID='123', PYTHON=trainer)
  assert result.returncode == 0, result.stderr
  (argv,) = commands(result.stdout)
  assert argv[0] == 'srun' and '--ntasks-per-node=1' in argv
  task = argv[argv.index('bash'):]
  assert task[4:] == [trainer, '-m', 'scale_jax.train', '--config', 'configs/large.py',
                      '--workdir', 'gs://bkt/runs/r1', f'--coordinator_address={host}:20123',
                      '--num_processes=2', TRICKY]
  # What each task runs: its own process id (read in the task, not in the batch script).
  for procid in ('0', '1'):
    ran = subprocess.run(task, capture_output=True, text=True, check=True,
                         env=clean_env(SLURM_PROCID=procid, SLURM_NODEID=procid))
    assert ran.stdout.splitlines()[-2:] == [TRICKY, f'--process_id={procid}']


def test_sbatch_scontrol_port_and_dry_run_env(tmp_path):
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  write_exe(bin_dir / 'scontrol', '#!/usr/bin/env bash\n[ "$1 $2 $3" = "show hostnames a[1-2]" ]'
            ' && printf "a1\\na2\\n"\n')
  result = sbatch('configs/large.py', '/shared/runs/r1', DRY_RUN='1',
                  SLURM_JOB_NODELIST='a[1-2]', SLURM_NNODES='2', PORT='29500',
                  PATH=f'{bin_dir}:{os.environ["PATH"]}')
  assert result.returncode == 0, result.stderr
  (argv,) = commands(result.stdout)
  assert '--coordinator_address=a1:29500' in argv and argv[-1] == '--num_processes=2'
  assert argv[argv.index('--workdir') + 1] == '/shared/runs/r1'


@pytest.mark.parametrize('env,message', [
    ({}, 'SLURM_JOB_NODELIST'),
    ({'SLURM_JOB_NODELIST': 'n1,n2'}, 'SLURM_NNODES'),
    ({'SLURM_JOB_NODELIST': 'n1,n2', 'SLURM_NNODES': '2', 'SLURM_NTASKS': '16'},
     '--ntasks-per-node=1'),
])
def test_sbatch_errors(env, message):
  result = sbatch('--dry-run', 'configs/large.py', 'gs://bkt/r', **env)
  assert result.returncode == 2 and message in result.stderr and not result.stdout
  result = sbatch('--dry-run', 'configs/large.py')
  assert result.returncode == 2 and 'CONFIG WORKDIR' in result.stderr


def test_sbatch_outside_slurm_without_dry_run_runs_nothing():
  # No scontrol here: a real start must not guess the coordinator.
  result = sbatch('configs/large.py', 'gs://bkt/r', SLURM_JOB_NODELIST='n1,n2', SLURM_NNODES='2',
                  PATH='/usr/bin:/bin')
  assert result.returncode == 2 and 'scontrol' in result.stderr and not result.stdout
