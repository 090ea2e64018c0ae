# shellcheck shell=bash
# Common library of the TPU VM launch scripts (sourced, never executed).
#
# - settings: read from an env file (`--env FILE`, else launch/env.sh when present); a variable already
#   set in the caller's environment wins over the file, so `ZONE=... launch/create.sh` overrides one value;
# - gdsd_run: the single place where commands are executed, or, under --dry-run, printed one per line,
#   quoted so that each printed line, pasted into a shell, runs exactly that command;
# - helpers shared by the scripts: validation with errors that name the setting, gcloud ssh/scp wrappers.

if [[ -z ${BASH_VERSINFO+x} ]] || ((BASH_VERSINFO[0] < 4 || (BASH_VERSINFO[0] == 4 && BASH_VERSINFO[1] < 4))); then
  echo "error: the launch scripts need bash >= 4.4 (on macOS: brew install bash)" >&2
  exit 2
fi

GDSD_LAUNCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
GDSD_REPO_ROOT=$(cd "$GDSD_LAUNCH_DIR/.." && pwd)
GDSD_DRY_RUN=${GDSD_DRY_RUN:-0}
GDSD_ENV_FILE=${GDSD_ENV_FILE:-}

# Every setting the scripts read, documented in launch/env.example (a test checks they all are).
# shellcheck disable=SC2034  # a reference list, read by the tests
GDSD_SETTINGS=(
  PROJECT_ID ZONE TPU_NAME ACCELERATOR_TYPE RUNTIME_VERSION CAPACITY CREATE_EXTRA_ARGS
  USE_QUEUED_RESOURCE QUEUED_RESOURCE_ID QR_VALID_UNTIL_DURATION QR_POLL_SECONDS QR_WAIT_TIMEOUT
  CODE_MODE LOCAL_DIR REPO_URL REPO_REF REMOTE_DIR PYTHON_VERSION CONSTRAINTS_FILE
  CHECKPOINT_BUCKET RUN_NAME CONFIG NUM_SLICES TRAIN_EXTRA_ARGS COMPILATION_CACHE_DIR
  TENSORSTORE_CURL_LOW_SPEED_TIME_SECONDS TENSORSTORE_CURL_LOW_SPEED_LIMIT_BYTES PASS_ENV
  REMOTE_LOG_DIR LOCAL_WORK_DIR NUM_WORKERS SSH_EXTRA_ARGS KILL_PATTERN
)

gdsd_die() {
  printf 'error: %s\n' "$*" >&2
  exit 2
}

gdsd_info() {
  printf '%s\n' "$*" >&2
}

# Quote one word for a POSIX shell: words made only of safe characters stay as they are, anything else is
# single-quoted (an embedded ' becomes '\''), so `$`, spaces, quotes and newlines survive unchanged.
gdsd_quote() {
  local s=$1 q="'\\''"
  if [[ -n $s && $s =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$s"
  elif [[ $s =~ ^(--[A-Za-z0-9-]+=)(.+)$ ]]; then
    # --flag='value' reads better than '--flag=value' and is the same word.
    printf "%s'%s'" "${BASH_REMATCH[1]}" "${BASH_REMATCH[2]//\'/$q}"
  else
    printf "'%s'" "${s//\'/$q}"
  fi
}

# Quote every argument and join them with spaces: the result is one shell command line.
gdsd_join_quoted() {
  local out="" w
  for w in "$@"; do
    out+="${out:+ }$(gdsd_quote "$w")"
  done
  printf '%s' "$out"
}

# Run a command, or under --dry-run print it (stdout, one line, exactly quoted) without running it.
gdsd_run() {
  if [[ $GDSD_DRY_RUN == 1 ]]; then
    printf '%s\n' "$(gdsd_join_quoted "$@")"
  else
    "$@"
  fi
}

# Print a note among the dry-run commands (a shell comment, so the output stays pasteable).
gdsd_dry_note() {
  if [[ $GDSD_DRY_RUN == 1 ]]; then
    printf '# %s\n' "$*"
  fi
}

# gdsd_parse_args HANDLER ARGS...: read a script's command line. Each argument goes first to HANDLER (called
# with the remaining arguments: it returns 0 when $1 is one of the script's own options, after setting
# GDSD_SHIFT when it took more than that word), then to the options every script accepts; anything else is
# an error (GDSD_ARGS_HINT, when set, is added to its message).
gdsd_parse_args() {
  local handler=$1
  shift
  while (($#)); do
    GDSD_SHIFT=1
    if "$handler" "$@" || gdsd_common_option "$@"; then
      shift "$GDSD_SHIFT"
    else
      gdsd_die "unknown argument '$1' (see --help${GDSD_ARGS_HINT:+; $GDSD_ARGS_HINT})"
    fi
  done
}

# gdsd_option_value WHAT ARGS...: the value of the option $1, given as `--name VALUE` or `--name=VALUE`, in
# GDSD_VALUE, and the words it took in GDSD_SHIFT; `--name` without a value is an error saying it needs WHAT.
gdsd_option_value() {
  local what=$1
  shift
  if [[ $1 == *=* ]]; then
    GDSD_VALUE=${1#*=}
    GDSD_SHIFT=1
  else
    [[ $# -ge 2 ]] || gdsd_die "$1 needs $what"
    GDSD_VALUE=$2
    GDSD_SHIFT=2
  fi
}

# Options every script accepts: returns 0 when $1 is one of them (GDSD_SHIFT: the words it took), 1
# otherwise. `--help` calls the script's own `usage` function.
gdsd_common_option() {
  GDSD_SHIFT=1
  case $1 in
    --env | --env=*)
      gdsd_option_value "a file name (e.g. --env launch/env.sh)" "$@"
      [[ -n $GDSD_VALUE ]] || gdsd_die "--env needs a file name (e.g. --env launch/env.sh)"
      GDSD_ENV_FILE=$GDSD_VALUE
      ;;
    --dry-run) GDSD_DRY_RUN=1 ;;
    -h | --help)
      usage
      exit 0
      ;;
    *) return 1 ;;
  esac
  return 0
}

# The value of --worker: a worker index (0, 1, ...) or all.
gdsd_check_worker() {
  [[ $1 == all || $1 =~ ^[0-9]+$ ]] || gdsd_die "--worker must be a worker index (0, 1, ...) or all (got '$1')"
}

# Help text shared by all scripts (appended to each script's usage).
gdsd_common_usage() {
  cat <<'EOF'

Common options:
  --env FILE   settings file (default: launch/env.sh when it exists; copy launch/env.example to start).
               A variable already set in the environment overrides the file.
  --dry-run    print the exact commands (gcloud and local) instead of running them.
  -h, --help   this help.
EOF
}

# Load the settings: source the env file, then put back every variable the caller's environment held
# (the environment wins), then fill defaults and validate the values that have a fixed form.
gdsd_load_env() {
  local file=$GDSD_ENV_FILE name
  if [[ -z $file && -f $GDSD_LAUNCH_DIR/env.sh ]]; then
    file=$GDSD_LAUNCH_DIR/env.sh
  fi
  local -A saved=()
  for name in $(compgen -e); do
    saved[$name]=${!name}
  done
  if [[ -n $file ]]; then
    [[ -f $file ]] || gdsd_die "env file not found: $file (copy launch/env.example and edit it)"
    # shellcheck source=/dev/null
    source "$file"
  fi
  for name in "${!saved[@]}"; do
    if [[ ${!name-} != "${saved[$name]}" ]]; then
      printf -v "$name" '%s' "${saved[$name]}"
    fi
  done
  GDSD_ENV_FILE_USED=${file:-"(none: settings from the environment)"}

  CAPACITY=${CAPACITY:-on-demand}
  USE_QUEUED_RESOURCE=${USE_QUEUED_RESOURCE:-0}
  QUEUED_RESOURCE_ID=${QUEUED_RESOURCE_ID:-${TPU_NAME:+${TPU_NAME}-qr}}
  QR_POLL_SECONDS=${QR_POLL_SECONDS:-30}
  QR_WAIT_TIMEOUT=${QR_WAIT_TIMEOUT:-0}
  CODE_MODE=${CODE_MODE:-copy}
  LOCAL_DIR=${LOCAL_DIR:-$GDSD_REPO_ROOT}
  REPO_REF=${REPO_REF:-main}
  REMOTE_DIR=${REMOTE_DIR:-gdsd-jax}
  PYTHON_VERSION=${PYTHON_VERSION:-3.12}
  CONSTRAINTS_FILE=${CONSTRAINTS_FILE-requirements/constraints-py${PYTHON_VERSION//./}.txt}
  CONFIG=${CONFIG:-configs/llada_8b_gsm8k.yaml}
  NUM_SLICES=${NUM_SLICES:-1}
  TRAIN_EXTRA_ARGS=${TRAIN_EXTRA_ARGS:-}
  # `-` (not `:-`): an empty value in the env file switches the compilation cache off.
  if [[ -z ${COMPILATION_CACHE_DIR+x} && -n ${CHECKPOINT_BUCKET:-} ]]; then
    COMPILATION_CACHE_DIR=gs://$CHECKPOINT_BUCKET/jax-compilation-cache
  fi
  COMPILATION_CACHE_DIR=${COMPILATION_CACHE_DIR:-}
  TENSORSTORE_CURL_LOW_SPEED_TIME_SECONDS=${TENSORSTORE_CURL_LOW_SPEED_TIME_SECONDS-60}
  TENSORSTORE_CURL_LOW_SPEED_LIMIT_BYTES=${TENSORSTORE_CURL_LOW_SPEED_LIMIT_BYTES-1024}
  PASS_ENV=${PASS_ENV-LIBTPU_INIT_ARGS}
  REMOTE_LOG_DIR=${REMOTE_LOG_DIR:-gdsd-logs}
  LOCAL_WORK_DIR=${LOCAL_WORK_DIR:-$GDSD_REPO_ROOT/runs/launch}
  NUM_WORKERS=${NUM_WORKERS:-}
  SSH_EXTRA_ARGS=${SSH_EXTRA_ARGS:-}
  CREATE_EXTRA_ARGS=${CREATE_EXTRA_ARGS:-}
  KILL_PATTERN=${KILL_PATTERN:-gdsd-jax}

  gdsd_check_enum CAPACITY on-demand spot reserved
  gdsd_check_enum USE_QUEUED_RESOURCE 0 1
  gdsd_check_enum CODE_MODE copy clone
  gdsd_check_regex PYTHON_VERSION '^3\.[0-9]+$' "a Python minor version such as 3.12"
  gdsd_check_regex NUM_SLICES '^[1-9][0-9]*$' "a positive number of TPU slices"
  gdsd_check_regex QR_POLL_SECONDS '^[1-9][0-9]*$' "a positive number of seconds"
  gdsd_check_regex QR_WAIT_TIMEOUT '^[0-9]+$' "a number of seconds (0 = wait forever)"
  # REMOTE_DIR is emptied (except .venv) before a fresh copy: keep it a plain relative path in $HOME.
  gdsd_check_regex REMOTE_DIR '^[A-Za-z0-9_][A-Za-z0-9._-]*(/[A-Za-z0-9_][A-Za-z0-9._-]*)*$' \
    "a relative directory under the remote home such as gdsd-jax (no '..', no leading '/' or '.')"
  gdsd_check_regex REMOTE_LOG_DIR '^[A-Za-z0-9_.][A-Za-z0-9._/-]*$' "a relative directory under the remote home"
  gdsd_check_regex KILL_PATTERN '^[A-Za-z0-9_][A-Za-z0-9._/ -]*$' \
    "a plain process-name fragment starting with a letter or digit"
  if [[ -n $NUM_WORKERS ]]; then
    gdsd_check_regex NUM_WORKERS '^[1-9][0-9]*$' "a positive worker count"
  fi
  if [[ -n ${CHECKPOINT_BUCKET:-} ]]; then
    [[ $CHECKPOINT_BUCKET != gs://* ]] ||
      gdsd_die "CHECKPOINT_BUCKET is a bucket name (optionally with a path), without gs://: got '$CHECKPOINT_BUCKET'"
    gdsd_check_regex CHECKPOINT_BUCKET '^[a-z0-9][a-z0-9._-]*(/[A-Za-z0-9._-]+)*$' "a bucket name such as my-bucket or my-bucket/prefix"
  fi
  if [[ -n ${RUN_NAME:-} ]]; then
    gdsd_check_regex RUN_NAME '^[A-Za-z0-9][A-Za-z0-9._-]*$' "letters, digits, '.', '_' and '-' (it names directories)"
  fi
  if [[ $CODE_MODE == clone ]]; then
    gdsd_require REPO_URL
  fi
  local word
  for word in $PASS_ENV; do
    [[ $word =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || gdsd_die "PASS_ENV lists variable names; '$word' is not a valid name"
  done
}

# Fail, naming every missing setting, unless all the named settings are non-empty.
gdsd_require() {
  local name missing=()
  for name in "$@"; do
    if [[ -z ${!name:-} ]]; then
      missing+=("$name")
    fi
  done
  if ((${#missing[@]})); then
    local list
    list=$(printf '%s, ' "${missing[@]}")
    gdsd_die "missing required setting(s): ${list%, } (set them in the env file $GDSD_ENV_FILE_USED or in the environment; see launch/env.example)"
  fi
}

gdsd_check_enum() {
  local name=$1 value allowed
  shift
  value=${!name-}
  for allowed in "$@"; do
    [[ $value == "$allowed" ]] && return 0
  done
  gdsd_die "$name must be one of: $* (got '$value')"
}

gdsd_check_regex() {
  local name=$1 regex=$2 what=$3
  [[ ${!name-} =~ $regex ]] || gdsd_die "$name must be $what (got '${!name-}')"
}

# Flags that place every gcloud TPU command.
gdsd_location_flags() {
  GDSD_LOC=(--zone="$ZONE" --project="$PROJECT_ID")
}

# Extra ssh/scp flags from SSH_EXTRA_ARGS (whitespace-separated, e.g. "--internal-ip").
gdsd_ssh_extra() {
  GDSD_SSH_EXTRA=()
  if [[ -n $SSH_EXTRA_ARGS ]]; then
    read -r -a GDSD_SSH_EXTRA <<<"$SSH_EXTRA_ARGS"
  fi
}

# gdsd_ssh WORKER COMMAND: run a shell command string on one worker (0, 1, ...) or on all of them.
gdsd_ssh() {
  local worker=$1 command=$2
  gdsd_location_flags
  gdsd_ssh_extra
  gdsd_run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${GDSD_LOC[@]}" --worker="$worker" \
    "${GDSD_SSH_EXTRA[@]}" --command="$command"
}

# Shell snippet (for the workers) that sets W to this worker's index: the TPU VM metadata server knows it;
# the hostname is the fallback off Google Cloud.
gdsd_remote_worker_id() {
  # shellcheck disable=SC2016  # expanded on the worker, not here
  printf '%s' 'W=$(curl -sf --max-time 10 -H "Metadata-Flavor: Google" http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number || hostname)'
}

# The process pattern for pgrep/pkill on the workers, written so that it does not match itself: the
# regex [g]dsd-jax matches "gdsd-jax" but the text "[g]dsd-jax" does not contain "gdsd-jax", so the shell
# that runs `pkill -f '[g]dsd-jax'` over ssh is not among the processes it kills.
gdsd_self_safe_pattern() {
  local p=$1
  printf '[%s]%s' "${p:0:1}" "${p:1}"
}

gdsd_summary() {
  gdsd_info "settings: $GDSD_ENV_FILE_USED | TPU ${TPU_NAME:-?} in ${ZONE:-?} (project ${PROJECT_ID:-?})"
}
