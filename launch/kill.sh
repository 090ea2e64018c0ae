#!/usr/bin/env bash
# Stop the job's processes on every worker (also the strays that keep the TPU busy after a crash).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat <<'EOF'
Usage: launch/kill.sh [--grace SECONDS] [--now] [--worker N|all] [--env FILE] [--dry-run]

On every worker (default), sends SIGTERM to the processes whose command line matches KILL_PATTERN
(default gdsd-jax: `pkill -f`), waits up to --grace seconds (default 300) for them to end (the trainer
writes a checkpoint on SIGTERM), then SIGKILLs what is left and removes /tmp/libtpu_lockfile so that the
next run can open the TPU ("TPU in use" otherwise).

Options:
  --grace S   seconds to wait after SIGTERM before SIGKILL (default 300).
  --now       SIGKILL at once (no checkpoint).
  --worker N  one worker only.
EOF
  gdsd_common_usage
}

grace=300
now=0
worker=all
kill_option() {
  case $1 in
    --grace | --grace=*)
      gdsd_option_value "a number of seconds" "$@"
      grace=$GDSD_VALUE
      ;;
    --now) now=1 ;;
    --worker | --worker=*)
      gdsd_option_value "a value: a worker index (0, 1, ...) or all" "$@"
      worker=$GDSD_VALUE
      ;;
    *) return 1 ;;
  esac
}
gdsd_parse_args kill_option "$@"
[[ $grace =~ ^[0-9]+$ ]] || gdsd_die "--grace must be a number of seconds (got '$grace')"
gdsd_check_worker "$worker"

gdsd_load_env
gdsd_require PROJECT_ID ZONE TPU_NAME
gdsd_summary

# The pattern never appears literally in this script (see gdsd_self_safe_pattern), so the remote shell
# running it is not one of its own targets.
pattern=$(gdsd_quote "$(gdsd_self_safe_pattern "$KILL_PATTERN")")
first_signal=TERM
if ((now)); then
  first_signal=KILL
  grace=0
fi
script="$(gdsd_remote_worker_id); P=$pattern"
script+="; if ! pgrep -f \"\$P\" >/dev/null; then echo \"worker \$W: no process matches\"; else"
script+=" pkill -$first_signal -f \"\$P\" || true"
script+="; for _ in \$(seq $grace); do pgrep -f \"\$P\" >/dev/null || break; sleep 1; done"
script+="; if pgrep -f \"\$P\" >/dev/null; then echo \"worker \$W: still running after $grace s: SIGKILL\"; pkill -KILL -f \"\$P\" || true; sleep 1; fi"
script+="; echo \"worker \$W: stopped\"; fi"
script+="; if pgrep -f \"\$P\" >/dev/null; then echo \"worker \$W: processes remain:\"; pgrep -af \"\$P\"; exit 1; fi"
script+="; rm -f /tmp/libtpu_lockfile"
gdsd_ssh "$worker" "$script"
