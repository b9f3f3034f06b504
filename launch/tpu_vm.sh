#!/usr/bin/env bash
# A Cloud TPU VM slice from this machine, through gcloud: create it, put the repository and a venv
# on every worker, start, follow, stop (SIGTERM: the trainer saves and exits 0) and delete.
# `launch/tpu_vm.sh --help` for the commands and settings; --dry-run prints every command instead.
set -euo pipefail
# shellcheck disable=SC2016,SC2088  # $HOME, $pid, ~ in the workers' command strings expand there

usage() {
  cat <<'EOF'
usage: launch/tpu_vm.sh COMMAND [options]
       launch/tpu_vm.sh run [options] CONFIG WORKDIR [trainer flags: --config.x=y ...]

commands
  create                 create the slice (gcloud compute tpus tpu-vm create)
  setup                  on every worker: the repository at --ref in --dir (tracked files are
                         forced to that commit; .venv and logs/ stay), a venv from --python,
                         pip install -e '.[EXTRAS]'. Run it again after a new commit.
  run CONFIG WORKDIR ... on every worker, in the background: python -m scale_jax.train --config
                         CONFIG --workdir WORKDIR --distributed ..., log in DIR/logs/train.log
                         of each worker. CONFIG is a path in the repository (configs/large.py);
                         WORKDIR must be storage every worker sees (gs://BUCKET/runs/NAME).
                         The same command again resumes from the latest checkpoint.
  tail                   follow the log of --worker (default 0: it prints the metrics)
  stop                   SIGTERM the trainer on every worker (it saves at the current step and
                         exits 0) and wait up to --timeout seconds for it to exit
  delete                 delete the slice (gcloud asks to confirm unless --yes)

settings: flag, or environment variable
  --name NAME            TPU_NAME             the slice's name (required)
  --zone ZONE            TPU_ZONE             e.g. us-west4-a (required)
  --project PROJECT      TPU_PROJECT          default: gcloud's core/project
  --accelerator-type T   TPU_ACCELERATOR_TYPE create: e.g. v5litepod-16 (required there)
  --version VERSION      TPU_RUNTIME_VERSION  create: the runtime (OS and TPU driver; jax and
                                              libtpu come from pip); default by type:
                                              v5litepod/v5e v2-alpha-tpuv5-lite, v5p
                                              v2-alpha-tpuv5, v6e v2-alpha-tpuv6e, v2-v4
                                              tpu-ubuntu2204-base
  --spot | --preemptible TPU_SPOT=1 | TPU_PREEMPTIBLE=1   create: a Spot / preemptible slice
  --repo URL             TPU_REPO_URL         setup: git URL the workers fetch from; default:
                                              this checkout's --ref, copied as a git bundle
                                              (committed changes only)
  --ref REF              TPU_REPO_REF         setup: branch, tag or commit (default HEAD; a bare
                                              commit id needs --repo)
  --dir DIR              TPU_REPO_DIR         the repository on the workers, relative to the
                                              home directory (default scale_jax)
  --python PY            TPU_PYTHON           setup: a Python >= 3.11 on the workers (default
                                              python3.11)
  --extras EXTRAS        TPU_EXTRAS           setup: pip extras (default tpu,gcs)
  --env NAME=VALUE                            run: an environment variable for the trainer
                                              (repeatable), e.g. JAX_COMPILATION_CACHE_DIR=gs://...
  --worker N             TPU_WORKER           tail: which worker (default 0)
  --timeout SECONDS      TPU_STOP_TIMEOUT     stop: how long to wait (default 600)
  --yes                                       delete: no confirmation prompt
  --dry-run              DRY_RUN=1            print the commands ('+ ' first), run nothing
  -h, --help
EOF
}

die() { echo "tpu_vm.sh: error: $*" >&2; exit 2; }

# Quotes one word for a POSIX shell: as is when safe, else in single quotes. Used for the printed
# commands (so a dry-run line pastes back as the same command) and for the command string the
# workers' shell parses (so a --config.name='a b' override arrives as one argument).
quote() {
  if [[ $1 =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}
quote_all() {
  local out='' word
  for word in "$@"; do out+="${out:+ }$(quote "$word")"; done
  printf '%s' "$out"
}

# Every command goes through here: printed first, not run under --dry-run.
x() {
  echo "+ $(quote_all "$@")"
  [[ $dry_run == 1 ]] || "$@"
}

# Settings: environment first, flags override.
name=${TPU_NAME:-} zone=${TPU_ZONE:-} project=${TPU_PROJECT:-}
accelerator=${TPU_ACCELERATOR_TYPE:-} version=${TPU_RUNTIME_VERSION:-}
spot=${TPU_SPOT:-0} preemptible=${TPU_PREEMPTIBLE:-0}
repo_url=${TPU_REPO_URL:-} ref=${TPU_REPO_REF:-HEAD} dir=${TPU_REPO_DIR:-scale_jax}
python=${TPU_PYTHON:-python3.11} extras=${TPU_EXTRAS:-tpu,gcs}
worker=${TPU_WORKER:-0} timeout=${TPU_STOP_TIMEOUT:-600} yes=0 dry_run=${DRY_RUN:-0}
envs=() command='' positional=() trainer_args=()

while (($#)); do
  arg=$1; shift
  # The trainer's flags come after CONFIG WORKDIR and are passed on as they are.
  if [[ $command == run && ${#positional[@]} == 2 ]]; then trainer_args+=("$arg"); continue; fi
  value=''
  case $arg in
    --*=*) value=${arg#*=}; arg=${arg%%=*}; has_value=1 ;;
    *) has_value=0 ;;
  esac
  case $arg in
    --name|--zone|--project|--accelerator-type|--version|--repo|--ref|--dir|--python|--extras|\
    --env|--worker|--timeout)
      if ((!has_value)); then
        (($#)) || die "$arg needs a value"
        value=$1; shift
      fi
      case $arg in
        --name) name=$value ;; --zone) zone=$value ;; --project) project=$value ;;
        --accelerator-type) accelerator=$value ;; --version) version=$value ;;
        --repo) repo_url=$value ;; --ref) ref=$value ;; --dir) dir=$value ;;
        --python) python=$value ;; --extras) extras=$value ;; --env) envs+=("$value") ;;
        --worker) worker=$value ;; --timeout) timeout=$value ;;
      esac ;;
    --spot) spot=1 ;;
    --preemptible) preemptible=1 ;;
    --yes) yes=1 ;;
    --dry-run) dry_run=1 ;;
    -h|--help) usage; exit 0 ;;
    -*) die "unknown option $arg${command:+ for $command}$([[ $command == run ]] &&
          echo ' (trainer flags go after CONFIG WORKDIR)') (see --help)" ;;
    *)
      if [[ -z $command ]]; then command=$arg; else positional+=("$arg"); fi ;;
  esac
done

[[ -n $command ]] || { usage >&2; exit 2; }
case $command in
  create|setup|run|tail|stop|delete) ;;
  *) die "unknown command '$command' (create, setup, run, tail, stop, delete; see --help)" ;;
esac
if [[ $command == run ]]; then
  ((${#positional[@]} == 2)) || die "run needs CONFIG WORKDIR, e.g. run configs/large.py gs://BUCKET/runs/r1"
elif ((${#positional[@]})); then
  die "$command takes no arguments (got: ${positional[*]}); settings are flags, see --help"
fi

[[ -n $name ]] || die "no TPU name: give --name NAME or set TPU_NAME"
[[ -n $zone ]] || die "no zone: give --zone ZONE or set TPU_ZONE (e.g. us-west4-a)"
# A leading ~/ would not expand inside the quotes below; the ssh command starts in $HOME anyway.
dir=${dir#\~/}
[[ -n $dir ]] || die "--dir / TPU_REPO_DIR is empty"

where=(--zone="$zone")
[[ -z $project ]] || where+=(--project="$project")

# One command string for every worker's shell; $HOME, $(hostname) etc. expand there.
on_workers() {  # on_workers WORKERS COMMAND_STRING
  x gcloud compute tpus tpu-vm ssh "$name" "${where[@]}" --worker="$1" --command="$2"
}

qdir=$(quote "$dir")
# The trainer's pid, for stop and for refusing a second run; the cmdline check keeps a stale pid
# file (the VM rebooted, the pid was reused) from naming some other process.
alive='{ pid=$(cat logs/train.pid 2>/dev/null) && grep -qa scale_jax.train /proc/"$pid"/cmdline 2>/dev/null; }'

case $command in
  create)
    [[ -n $accelerator ]] || die "no accelerator type: give --accelerator-type TYPE or set TPU_ACCELERATOR_TYPE (e.g. v5litepod-16)"
    if [[ -z $version ]]; then
      # Google's base runtimes for JAX: the OS and the TPU driver only. jax (pinned in setup.cfg)
      # and libtpu come from pip in setup, so the runtime need not follow the jax version.
      case $accelerator in
        v5litepod-*|v5e-*) version=v2-alpha-tpuv5-lite ;;
        v5p-*) version=v2-alpha-tpuv5 ;;
        v6e-*) version=v2-alpha-tpuv6e ;;
        v2-*|v3-*|v4-*) version=tpu-ubuntu2204-base ;;
        *) die "no default runtime for $accelerator: give --version or set TPU_RUNTIME_VERSION (gcloud compute tpus tpu-vm versions list --zone=$zone)" ;;
      esac
    fi
    [[ $spot == 1 && $preemptible == 1 ]] && die "--spot and --preemptible exclude each other: pick one"
    extra=()
    [[ $spot == 1 ]] && extra+=(--spot)
    [[ $preemptible == 1 ]] && extra+=(--preemptible)
    x gcloud compute tpus tpu-vm create "$name" "${where[@]}" --accelerator-type="$accelerator" \
      --version="$version" ${extra[@]+"${extra[@]}"}
    ;;

  setup)
    if [[ -n $repo_url ]]; then
      source_=$(quote "$repo_url")
    else
      # No URL: this checkout's commit travels as a git bundle, so private or unpushed commits
      # work and the workers need no credentials. Uncommitted changes stay here.
      repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
      bundle=${TMPDIR:-/tmp}/scale_jax-$name.bundle
      x git -C "$repo_root" bundle create "$bundle" "$ref"
      x gcloud compute tpus tpu-vm scp "$bundle" "$name:scale_jax.bundle" "${where[@]}" --worker=all
      x rm -f "$bundle"
      source_='"$HOME"/scale_jax.bundle'
    fi
    qpy=$(quote "$python")
    # git init + fetch + forced checkout both installs and updates: deleted files go, .venv and
    # logs/ (untracked) stay. The Python check comes first: the TPU runtimes ship Ubuntu 22.04's
    # Python 3.10 and setup.cfg needs >= 3.11.
    script="set -e; cd \"\$HOME\"; "
    script+="if ! $qpy -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then "
    script+="echo \"\$(hostname): $qpy is missing or older than 3.11: install one (sudo apt-get "
    script+="install -y python3.11 python3.11-venv) or give --python PATH\" >&2; exit 1; fi; "
    script+="mkdir -p $qdir; cd $qdir; "
    script+="if [ ! -d .git ]; then git init -q .; fi; "
    script+="git fetch -q $source_ $(quote "$ref"); "
    script+="git checkout -q -f --detach FETCH_HEAD; "
    script+="if [ ! -x .venv/bin/python ]; then $qpy -m venv .venv; fi; "
    script+=".venv/bin/python -m pip install -q --upgrade pip; "
    script+=".venv/bin/python -m pip install -q -e $(quote ".[$extras]"); "
    script+="echo \"\$(hostname): $qdir at \$(git rev-parse --short HEAD), installed\""
    on_workers all "$script"
    ;;

  run)
    config=${positional[0]} workdir=${positional[1]}
    [[ $workdir == gs://* ]] || echo "tpu_vm.sh: note: WORKDIR $workdir is not gs://: it must be storage every worker sees (a gcsfuse or NFS mount)" >&2
    exports=''
    for kv in ${envs[@]+"${envs[@]}"}; do
      [[ $kv =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env wants NAME=VALUE, got '$kv'"
      exports+="export ${kv%%=*}=$(quote "${kv#*=}"); "
    done
    train=(.venv/bin/python -m scale_jax.train --config "$config" --workdir "$workdir"
           --distributed ${trainer_args[@]+"${trainer_args[@]}"})
    # nohup, and all three streams redirected: the process outlives the ssh session, and ssh does
    # not wait on its output. $! is the trainer itself (nohup execs it), which is what stop signals.
    script="set -e; cd \"\$HOME\"/$qdir; mkdir -p logs; "
    script+="if $alive; then echo \"\$(hostname): the trainer is already running (pid \$pid): "
    script+="launch/tpu_vm.sh stop first\" >&2; exit 1; fi; "
    script+="echo \"=== \$(date -u +%FT%TZ) start\" >> logs/train.log; "
    script+="$exports"
    script+="nohup $(quote_all "${train[@]}") >> logs/train.log 2>&1 < /dev/null & "
    script+="echo \$! > logs/train.pid; "
    script+="echo \"\$(hostname): started pid \$!, log ~/$qdir/logs/train.log\""
    on_workers all "$script"
    ;;

  tail)
    [[ $worker =~ ^[0-9]+$ ]] || die "--worker wants one worker number, got '$worker'"
    on_workers "$worker" "tail -n 200 -F \"\$HOME\"/$qdir/logs/train.log"
    ;;

  stop)
    [[ $timeout =~ ^[0-9]+$ ]] || die "--timeout wants seconds, got '$timeout'"
    script="cd \"\$HOME\"/$qdir 2>/dev/null || { echo \"\$(hostname): no ~/$qdir\"; exit 0; }; "
    script+="if ! $alive; then echo \"\$(hostname): not running\"; exit 0; fi; "
    script+="kill -TERM \"\$pid\"; echo \"\$(hostname): SIGTERM sent to \$pid, waiting for it to save and exit\"; "
    script+="i=0; while kill -0 \"\$pid\" 2>/dev/null; do "
    script+="if [ \$i -ge $timeout ]; then echo \"\$(hostname): still running after ${timeout}s (see "
    script+="~/$qdir/logs/train.log); kill -KILL \$pid loses the steps since the last checkpoint\" >&2; exit 1; fi; "
    script+="sleep 1; i=\$((i + 1)); done; echo \"\$(hostname): stopped\""
    on_workers all "$script"
    ;;

  delete)
    extra=()
    [[ $yes == 1 ]] && extra+=(--quiet)
    x gcloud compute tpus tpu-vm delete "$name" "${where[@]}" ${extra[@]+"${extra[@]}"}
    ;;
esac
