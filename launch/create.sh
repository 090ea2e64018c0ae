#!/usr/bin/env bash
# Create the TPU VM (a pod slice: one VM per worker) or request it as a queued resource.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat <<'EOF'
Usage: launch/create.sh [--wait] [--env FILE] [--dry-run]

Creates the TPU VM TPU_NAME (ACCELERATOR_TYPE, RUNTIME_VERSION) in ZONE of PROJECT_ID with
`gcloud compute tpus tpu-vm create`, or, with USE_QUEUED_RESOURCE=1, requests it as the queued resource
QUEUED_RESOURCE_ID (node id TPU_NAME) with `gcloud compute tpus queued-resources create`.
CAPACITY=spot adds --spot, CAPACITY=reserved adds --reserved (on-demand: neither).

Options:
  --wait       queued resource only: poll its state every QR_POLL_SECONDS until it is ACTIVE
               (fails on FAILED/SUSPENDED, or after QR_WAIT_TIMEOUT seconds when that is > 0).
EOF
  gdsd_common_usage
}

wait_active=0
create_option() {
  case $1 in
    --wait) wait_active=1 ;;
    *) return 1 ;;
  esac
}
gdsd_parse_args create_option "$@"

gdsd_load_env
gdsd_require PROJECT_ID ZONE TPU_NAME ACCELERATOR_TYPE RUNTIME_VERSION
gdsd_summary
gdsd_location_flags

capacity_flags=()
case $CAPACITY in
  spot) capacity_flags=(--spot) ;;
  reserved) capacity_flags=(--reserved) ;;
esac
extra=()
if [[ -n $CREATE_EXTRA_ARGS ]]; then
  read -r -a extra <<<"$CREATE_EXTRA_ARGS"
fi

if [[ $USE_QUEUED_RESOURCE == 0 ]]; then
  if ((wait_active)); then
    gdsd_info "note: --wait applies to queued resources only; tpu-vm create already waits for the VM"
  fi
  gdsd_run gcloud compute tpus tpu-vm create "$TPU_NAME" "${GDSD_LOC[@]}" \
    --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION" "${capacity_flags[@]}" "${extra[@]}"
  exit 0
fi

valid_until=()
if [[ -n ${QR_VALID_UNTIL_DURATION:-} ]]; then
  valid_until=(--valid-until-duration="$QR_VALID_UNTIL_DURATION")
fi
gdsd_run gcloud compute tpus queued-resources create "$QUEUED_RESOURCE_ID" --node-id="$TPU_NAME" "${GDSD_LOC[@]}" \
  --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$RUNTIME_VERSION" "${capacity_flags[@]}" \
  "${valid_until[@]}" "${extra[@]}"

describe=(gcloud compute tpus queued-resources describe "$QUEUED_RESOURCE_ID" "${GDSD_LOC[@]}"
  --format='value(state.state)')
if ((!wait_active)); then
  gdsd_info "queued resource $QUEUED_RESOURCE_ID requested; its state: $(gdsd_join_quoted "${describe[@]}")"
  exit 0
fi
if [[ $GDSD_DRY_RUN == 1 ]]; then
  gdsd_dry_note "--wait: repeat every $QR_POLL_SECONDS s until the state is ACTIVE:"
  gdsd_run "${describe[@]}"
  exit 0
fi

start=$SECONDS
failures=0
while true; do
  # A transient gcloud error must not end a long wait; five in a row (a wrong name, lost credentials) do.
  if state=$("${describe[@]}"); then
    failures=0
  else
    failures=$((failures + 1))
    ((failures < 5)) || gdsd_die "could not read the state of queued resource $QUEUED_RESOURCE_ID (5 gcloud errors in a row)"
    state=""
  fi
  case $state in
    ACTIVE)
      gdsd_info "queued resource $QUEUED_RESOURCE_ID is ACTIVE: TPU VM $TPU_NAME is ready"
      exit 0
      ;;
    FAILED | SUSPENDED | SUSPENDING)
      gdsd_die "queued resource $QUEUED_RESOURCE_ID is $state (see: gcloud compute tpus queued-resources describe $QUEUED_RESOURCE_ID --zone=$ZONE --project=$PROJECT_ID)"
      ;;
  esac
  if ((QR_WAIT_TIMEOUT > 0 && SECONDS - start >= QR_WAIT_TIMEOUT)); then
    gdsd_die "queued resource $QUEUED_RESOURCE_ID still ${state:-unknown} after QR_WAIT_TIMEOUT=$QR_WAIT_TIMEOUT s"
  fi
  gdsd_info "queued resource $QUEUED_RESOURCE_ID: ${state:-unknown} (waiting, next check in $QR_POLL_SECONDS s)"
  sleep "$QR_POLL_SECONDS"
done
