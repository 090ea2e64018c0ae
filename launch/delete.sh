#!/usr/bin/env bash
# Delete the TPU VM, or the queued resource together with its TPU VM.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat <<'EOF'
Usage: launch/delete.sh [--yes] [--async] [--env FILE] [--dry-run]

Deletes TPU_NAME (`gcloud compute tpus tpu-vm delete`) or, with USE_QUEUED_RESOURCE=1, the queued
resource QUEUED_RESOURCE_ID and its TPU VM (`gcloud compute tpus queued-resources delete --force`).
Checkpoints and logs in gs://CHECKPOINT_BUCKET are not touched; worker disks (and their log files) are:
run launch/logs.sh collect first if you want them.

Options:
  --yes     do not ask for confirmation (passes --quiet to gcloud).
  --async   return without waiting for the deletion to finish.
EOF
  gdsd_common_usage
}

flags=()
delete_option() {
  case $1 in
    --yes) flags+=(--quiet) ;;
    --async) flags+=(--async) ;;
    *) return 1 ;;
  esac
}
gdsd_parse_args delete_option "$@"

gdsd_load_env
gdsd_require PROJECT_ID ZONE TPU_NAME
gdsd_summary
gdsd_location_flags

if [[ $USE_QUEUED_RESOURCE == 1 ]]; then
  gdsd_run gcloud compute tpus queued-resources delete "$QUEUED_RESOURCE_ID" "${GDSD_LOC[@]}" --force "${flags[@]}"
else
  gdsd_run gcloud compute tpus tpu-vm delete "$TPU_NAME" "${GDSD_LOC[@]}" "${flags[@]}"
fi
