#!/bin/bash
# Trains patchdiff on every worker of a Cloud TPU VM (a single host or a pod slice), the way
# big_vision's TPU VM instructions do: `gcloud compute tpus tpu-vm ssh NAME --worker=all
# --command "..."` runs the same command on each worker, and jax.distributed.initialize()
# (--config.distributed=True) finds the other workers through the TPU metadata.
#
#   launch/tpu/run_pod.sh [options] TPU_NAME ZONE -- PATCHDIFF_MAIN_ARGS...
#
#   launch/tpu/run_pod.sh my-v5e-32 us-west4-a -- \
#       --config ml_collections_configs/imagenet64_adm.py --workdir /mnt/shared/runs/i64
#
# Steps, each on all workers: (1) the code: this checkout's files (tracked and untracked, not
# ignored) copied as a tarball, or `--repo URL` cloned; (2) a venv and `pip install -e ".[tpu]"`;
# (3) `python -m patchdiff.main ARGS --config.distributed=True`, in the foreground (every
# worker's output here; Ctrl-C or a dropped connection ends it: run it again to resume) or with
# --background (nohup; log in ~/patchdiff-train.log on each worker; --stop sends SIGTERM, after
# which all workers save a checkpoint at the same step and exit).
#
# The workdir must be one directory that every worker reaches: a Filestore (NFS) or gcsfuse
# mount at the same path on each worker. patchdiff's workdir is a local path, never gs://.
#
# Options:
#   --dry-run          print the commands instead of running them (also: DRY_RUN=1)
#   --project P        gcloud project (default: gcloud's configured project)
#   --repo URL         clone URL on every worker instead of copying this checkout
#   --branch B         with --repo: the branch or tag (default: main)
#   --dir DIR          the code's folder on the workers, relative to ~ (default: patchdiff)
#   --python PY        the workers' Python, 3.11 or newer (default: python3)
#   --skip-setup       skip steps (1) and (2): the code and venv are there already
#   --background       step (3) with nohup, its pid in ~/patchdiff-train.pid
#   --stop             only SIGTERM the --background run on every worker
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//' >&2; exit 2; }
die() { echo "run_pod.sh: $*" >&2; exit 2; }

dry_run=${DRY_RUN:-0}
project="" repo="" branch=main dir=patchdiff python=python3
skip_setup=0 background=0 stop=0
positional=()
while (( $# )); do
  case $1 in
    --dry-run) dry_run=1 ;;
    --project) project=${2:?--project needs a value}; shift ;;
    --repo) repo=${2:?--repo needs a URL}; shift ;;
    --branch) branch=${2:?--branch needs a value}; shift ;;
    --dir) dir=${2:?--dir needs a value}; shift ;;
    --python) python=${2:?--python needs a value}; shift ;;
    --skip-setup) skip_setup=1 ;;
    --background) background=1 ;;
    --stop) stop=1 ;;
    -h|--help) usage ;;
    --) shift; break ;;
    -*) die "unknown option $1; the options are listed by $0 --help." ;;
    *) positional+=("$1") ;;
  esac
  shift
done
(( ${#positional[@]} == 2 )) || die "give TPU_NAME and ZONE, then -- and patchdiff.main's arguments."
name=${positional[0]} zone=${positional[1]}
main_args=("$@")

if (( ! stop )); then
  (( ${#main_args[@]} )) || die "give patchdiff.main's arguments after --, e.g. -- --config FILE --workdir DIR."
  for (( i = 0; i < ${#main_args[@]}; i++ )); do
    arg=${main_args[i]} workdir=""
    [[ $arg == --workdir=* ]] && workdir=${arg#--workdir=}
    [[ $arg == --workdir ]] && workdir=${main_args[i + 1]:-}
    [[ $workdir == gs://* ]] && die "--workdir $workdir: patchdiff needs a local path that every worker shares (a gcsfuse or Filestore mount), not gs://."
  done
fi

gcloud_tpu=(gcloud compute tpus tpu-vm)
where=(--zone="$zone" --worker=all)
[[ -n $project ]] && where+=(--project="$project")

shell_word() {  # one word as a shell reads it back: bare when safe, else in single quotes
  if [[ $1 =~ ^[A-Za-z0-9_./:=,+@%-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

run() {  # prints the command with --dry-run, runs it otherwise
  if (( dry_run )); then
    local word line=""
    for word in "$@"; do line+="${line:+ }$(shell_word "$word")"; done
    echo "$line"
  else
    "$@"
  fi
}
on_all_workers() { run "${gcloud_tpu[@]}" ssh "$name" "${where[@]}" --command "$1"; }

if (( stop )); then
  on_all_workers 'kill -TERM "$(cat ~/patchdiff-train.pid)"'
  exit 0
fi

qdir=$(printf '%q' "$dir")
if (( ! skip_setup )); then
  if [[ -n $repo ]]; then
    qrepo=$(printf '%q' "$repo") qbranch=$(printf '%q' "$branch")
    on_all_workers "if [ -d $qdir/.git ]; then git -C $qdir fetch --depth=1 origin $qbranch && git -C $qdir checkout -f FETCH_HEAD; else git clone --depth=1 --branch $qbranch $qrepo $qdir; fi"
  else
    top=$(cd "$(dirname "$0")/../.." && pwd)
    tarball=${TMPDIR:-/tmp}/patchdiff-src.tar.gz
    if (( dry_run )); then
      echo "(cd $(printf '%q' "$top") && git ls-files -z --cached --others --exclude-standard | tar czf $(printf '%q' "$tarball") --null -T -)"
    else
      (cd "$top" && git ls-files -z --cached --others --exclude-standard | tar czf "$tarball" --null -T -)
    fi
    run "${gcloud_tpu[@]}" scp "$tarball" "$name:patchdiff-src.tar.gz" "${where[@]}"
    on_all_workers "mkdir -p $qdir && tar xzf patchdiff-src.tar.gz -C $qdir"
  fi
  qpython=$(printf '%q' "$python")
  check="$qpython -c \"import sys; sys.exit(sys.version_info < (3, 11))\" || { echo \"patchdiff needs Python 3.11+: pass --python python3.11\" >&2; exit 1; }"
  on_all_workers "$check; cd $qdir && $qpython -m venv .venv && . .venv/bin/activate && pip install -q -U pip && pip install -q -e \".[tpu]\""
fi

train="python -m patchdiff.main$(printf ' %q' "${main_args[@]}") --config.distributed=True"
if (( background )); then
  on_all_workers "cd $qdir && . .venv/bin/activate && nohup $train > ~/patchdiff-train.log 2>&1 < /dev/null & echo \$! > ~/patchdiff-train.pid"
else
  on_all_workers "cd $qdir && . .venv/bin/activate && $train"
fi
