#!/usr/bin/env bash
# Follow the run's logs on the workers, or copy every worker's log file here.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat <<'EOF'
Usage: launch/logs.sh tail [--worker N|all] [--lines N] [--no-follow] [--env FILE] [--dry-run]
       launch/logs.sh collect [--dest DIR] [--env FILE] [--dry-run]

Each worker writes ~/REMOTE_LOG_DIR/RUN_NAME/worker-<index>.log (see launch/run.sh).

  tail      print the last lines (default 100) and keep following (tail -F) the log of worker 0
            (process 0 prints the metrics), or of --worker N, or of all workers (lines prefixed
            "[worker W]"). Ctrl-C stops following; the job keeps running.
  collect   copy each worker's log file to DIR/worker-<index>.log (default DIR:
            LOCAL_WORK_DIR/logs/RUN_NAME), one `gcloud compute tpus tpu-vm scp --worker=<index>` per
            worker. The worker count is NUM_WORKERS when set, else read with
            `gcloud compute tpus tpu-vm describe` (--dry-run needs NUM_WORKERS).
EOF
  gdsd_common_usage
}

worker=0
lines=100
follow=1
dest=""
action=""
logs_option() {
  case $1 in
    tail | collect)
      [[ -z $action ]] || gdsd_die "give one action, tail or collect (got '$action' and '$1')"
      action=$1
      ;;
    --worker | --worker=*)
      gdsd_option_value "a value: a worker index (0, 1, ...) or all" "$@"
      worker=$GDSD_VALUE
      ;;
    --lines | --lines=*)
      gdsd_option_value "a value" "$@"
      lines=$GDSD_VALUE
      ;;
    --dest | --dest=*)
      gdsd_option_value "a value" "$@"
      dest=$GDSD_VALUE
      ;;
    --no-follow) follow=0 ;;
    -*) return 1 ;;
    *)
      [[ -n $action ]] || gdsd_die "unknown action '$1': expected tail or collect (see --help)"
      return 1
      ;;
  esac
}
gdsd_parse_args logs_option "$@"
[[ -n $action ]] || gdsd_die "give an action: tail or collect (see --help)"
gdsd_check_worker "$worker"
[[ $lines =~ ^[0-9]+$ ]] || gdsd_die "--lines must be a number of lines (got '$lines')"

gdsd_load_env
gdsd_require PROJECT_ID ZONE TPU_NAME RUN_NAME
gdsd_summary
gdsd_location_flags
gdsd_ssh_extra
remote_logs=$REMOTE_LOG_DIR/$RUN_NAME

if [[ $action == tail ]]; then
  tail_flags="-n $lines"
  if ((follow)); then
    tail_flags+=" -F"
  fi
  script="set -euo pipefail; $(gdsd_remote_worker_id)"
  script+="; tail $tail_flags \"\$HOME\"/$(gdsd_quote "$remote_logs")/\"worker-\$W.log\" | sed -u \"s/^/[worker \$W] /\""
  gdsd_ssh "$worker" "$script"
  exit 0
fi

dest=${dest:-$LOCAL_WORK_DIR/logs/$RUN_NAME}
if [[ -n $NUM_WORKERS ]]; then
  count=$NUM_WORKERS
elif [[ $GDSD_DRY_RUN == 1 ]]; then
  gdsd_die "logs.sh collect --dry-run needs NUM_WORKERS (otherwise the worker count is read with gcloud)"
else
  endpoints=$(gcloud compute tpus tpu-vm describe "$TPU_NAME" "${GDSD_LOC[@]}" --flatten=networkEndpoints \
    --format='value(networkEndpoints.ipAddress)')
  count=$(grep -c . <<<"$endpoints" || true)
  ((count > 0)) || gdsd_die "could not read the worker count of $TPU_NAME (set NUM_WORKERS)"
fi
gdsd_run mkdir -p "$dest"
failed=0
for ((w = 0; w < count; w++)); do
  # One worker failing (e.g. no log yet) must not hide the others' logs.
  if ! gdsd_run gcloud compute tpus tpu-vm scp "$TPU_NAME:$remote_logs/worker-$w.log" "$dest/worker-$w.log" \
    "${GDSD_LOC[@]}" --worker="$w" "${GDSD_SSH_EXTRA[@]}"; then
    gdsd_info "worker $w: could not copy its log"
    failed=$((failed + 1))
  fi
done
if [[ $GDSD_DRY_RUN != 1 ]]; then
  gdsd_info "logs of $((count - failed))/$count workers in $dest"
fi
((failed == 0))
