#!/usr/bin/env bash
# Run a command (by default the training job) on every worker, with the run's environment.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat <<'EOF'
Usage: launch/run.sh [--foreground] [--worker N|all] [--env FILE] [--dry-run] [-- COMMAND [ARG...]]

Runs COMMAND in ~/REMOTE_DIR on the workers (default: all) with the environment's .venv first on PATH and
  CHECKPOINT_BUCKET, RUN_NAME, JAX_COMPILATION_CACHE_DIR (from COMPILATION_CACHE_DIR; empty = off: GDSD_JAX_COMPILATION_CACHE=off),
  TENSORSTORE_CURL_LOW_SPEED_TIME_SECONDS, TENSORSTORE_CURL_LOW_SPEED_LIMIT_BYTES,
  and every variable named in PASS_ENV that is set (e.g. LIBTPU_INIT_ARGS)
exported. Each worker appends COMMAND's output to ~/REMOTE_LOG_DIR/RUN_NAME/worker-<index>.log.
Every word of COMMAND reaches the workers unchanged; for pipes or `&&`, run `-- bash -c '...'`.

Default COMMAND (the trainer calls jax.distributed.initialize() itself on a TPU VM):
  gdsd-jax train --config CONFIG --output-dir gs://CHECKPOINT_BUCKET/RUN_NAME --resume
    [distributed.num_slices=NUM_SLICES when above 1] TRAIN_EXTRA_ARGS...

Options:
  --foreground  stay attached: stream the output (lines prefixed "[worker W]") and also append it to
                LOCAL_WORK_DIR/logs/RUN_NAME/foreground.log; the job ends if the connection drops.
                Default: detached (nohup), returns at once; follow with launch/logs.sh tail.
  --worker N    one worker only (e.g. 0 for a one-host job such as the checkpoint conversion).
EOF
  gdsd_common_usage
}

foreground=0
worker=all
cmd=()
run_option() {
  case $1 in
    --foreground) foreground=1 ;;
    --worker | --worker=*)
      gdsd_option_value "a value: a worker index (0, 1, ...) or all" "$@"
      worker=$GDSD_VALUE
      ;;
    --)
      cmd=("${@:2}")
      GDSD_SHIFT=$#
      ;;
    *) return 1 ;;
  esac
}
GDSD_ARGS_HINT="put the command to run after --"
gdsd_parse_args run_option "$@"
gdsd_check_worker "$worker"

gdsd_load_env
gdsd_require PROJECT_ID ZONE TPU_NAME CHECKPOINT_BUCKET RUN_NAME
gdsd_summary

if ((${#cmd[@]} == 0)); then
  cmd=(gdsd-jax train --config "$CONFIG" --output-dir "gs://$CHECKPOINT_BUCKET/$RUN_NAME" --resume)
  if ((NUM_SLICES > 1)); then  # multislice: the data axis crosses the slices (gdsd_jax/distributed/mesh.py)
    cmd+=("distributed.num_slices=$NUM_SLICES")
  fi
  if [[ -n $TRAIN_EXTRA_ARGS ]]; then
    read -r -a extra <<<"$TRAIN_EXTRA_ARGS"
    cmd+=("${extra[@]}")
  fi
fi
# A first word like A=b would turn into an assignment on the worker's shell: ask for `env A=b ...` instead.
[[ ${cmd[0]} != *=* ]] || gdsd_die "the command's first word '${cmd[0]}' looks like a variable assignment; write: -- env ${cmd[0]} ..."
cmdline=$(gdsd_join_quoted "${cmd[@]}")

# PYTHONUNBUFFERED: output reaches the log file line by line, so `logs.sh tail` shows progress as it happens.
exports=(CHECKPOINT_BUCKET="$CHECKPOINT_BUCKET" RUN_NAME="$RUN_NAME" PYTHONUNBUFFERED=1)
if [[ -n $COMPILATION_CACHE_DIR ]]; then
  exports+=(JAX_COMPILATION_CACHE_DIR="$COMPILATION_CACHE_DIR")
else  # gdsd-jax would otherwise cache under the worker's ~/.cache
  exports+=(GDSD_JAX_COMPILATION_CACHE=off)
fi
for name in TENSORSTORE_CURL_LOW_SPEED_TIME_SECONDS TENSORSTORE_CURL_LOW_SPEED_LIMIT_BYTES; do
  if [[ -n ${!name} ]]; then
    exports+=("$name=${!name}")
  fi
done
for name in $PASS_ENV; do
  if [[ -n ${!name+x} ]]; then
    exports+=("$name=${!name}")
  fi
done

script="set -euo pipefail; $(gdsd_remote_worker_id); cd $(gdsd_quote "$REMOTE_DIR")"
script+="; L=\"\$HOME\"/$(gdsd_quote "$REMOTE_LOG_DIR/$RUN_NAME"); mkdir -p \"\$L\""
script+="; export VIRTUAL_ENV=\"\$PWD/.venv\" PATH=\"\$PWD/.venv/bin:\$PATH\""
script+="; export $(gdsd_join_quoted "${exports[@]}")"
script+="; printf '=== %s worker %s: %s\\n' \"\$(date -u +%Y-%m-%dT%H:%M:%SZ)\" \"\$W\" $(gdsd_quote "$cmdline") >>\"\$L/worker-\$W.log\""
if ((foreground)); then
  script+="; $cmdline 2>&1 | tee -a \"\$L/worker-\$W.log\" | sed -u \"s/^/[worker \$W] /\""
  if [[ $GDSD_DRY_RUN == 1 ]]; then
    gdsd_ssh "$worker" "$script"
  else
    local_log=$LOCAL_WORK_DIR/logs/$RUN_NAME/foreground.log
    mkdir -p "$(dirname "$local_log")"
    gdsd_info "streaming; a copy goes to $local_log"
    gdsd_ssh "$worker" "$script" | tee -a "$local_log"
  fi
else
  # nohup + all three streams redirected: the job outlives the ssh session, and ssh returns at once.
  script+="; nohup $cmdline >>\"\$L/worker-\$W.log\" 2>&1 </dev/null &"
  script+=" echo \"worker \$W: started pid \$! (log: \$L/worker-\$W.log)\""
  gdsd_ssh "$worker" "$script"
  if [[ $GDSD_DRY_RUN != 1 ]]; then
    gdsd_info "started; follow with: launch/logs.sh tail   (stop with: launch/kill.sh)"
  fi
fi
