#!/usr/bin/env bash
# Put the code on every worker (copy or git clone) and build its Python environment there.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat <<'EOF'
Usage: launch/setup.sh [--code-only | --env-only] [--env FILE] [--dry-run]

On every worker of TPU_NAME (--worker=all):
  1. the code, into ~/REMOTE_DIR:
     CODE_MODE=copy  (default) packs LOCAL_DIR into a tarball (without .git, .venv*, runs/, caches, build
                     outputs, launch/env.sh), copies it with `gcloud compute tpus tpu-vm scp --worker=all`
                     and unpacks it; ~/REMOTE_DIR is replaced except its .venv.
     CODE_MODE=clone runs `git clone REPO_URL` (once) and checks out REPO_REF (branch, tag or commit).
  2. the environment: `pip install uv`, `uv venv --python PYTHON_VERSION .venv`, then
     `uv pip install "jax[tpu]" -e ".[gcs]"` with the pinned constraints CONSTRAINTS_FILE when the code has it
     (default requirements/constraints-py312.txt), and an import check.

Options:
  --code-only  step 1 only (update the code, keep the environment).
  --env-only   step 2 only.
EOF
  gdsd_common_usage
}

do_code=1
do_env=1
setup_option() {
  case $1 in
    --code-only) do_env=0 ;;
    --env-only) do_code=0 ;;
    *) return 1 ;;
  esac
}
gdsd_parse_args setup_option "$@"
((do_code || do_env)) || gdsd_die "--code-only and --env-only exclude each other"

gdsd_load_env
gdsd_require PROJECT_ID ZONE TPU_NAME
gdsd_summary
gdsd_location_flags
gdsd_ssh_extra

dir=$(gdsd_quote "$REMOTE_DIR")
remote_tarball=gdsd-jax-code.tar.gz
script="set -euo pipefail; $(gdsd_remote_worker_id)"

if ((do_code)) && [[ $CODE_MODE == copy ]]; then
  [[ -d $LOCAL_DIR ]] || gdsd_die "LOCAL_DIR is not a directory: '$LOCAL_DIR'"
  [[ -f $LOCAL_DIR/pyproject.toml ]] || gdsd_die "LOCAL_DIR must be the gdsd-jax checkout (no pyproject.toml in '$LOCAL_DIR')"
  tarball=$LOCAL_WORK_DIR/code.tar.gz
  gdsd_run mkdir -p "$LOCAL_WORK_DIR"
  # Excludes come before the operand (GNU tar applies them to the names that follow). Top-level names
  # are anchored with ./ so that a package directory called e.g. `runs` deeper down is still copied.
  gdsd_run tar -czf "$tarball" --exclude=./.git --exclude='./.venv*' --exclude=./runs --exclude=./build \
    --exclude=./dist --exclude=./.cache --exclude=./launch/env.sh --exclude=__pycache__ --exclude='*.pyc' \
    --exclude=.pytest_cache --exclude='*.egg-info' -C "$LOCAL_DIR" .
  gdsd_run gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME:$remote_tarball" "${GDSD_LOC[@]}" --worker=all \
    "${GDSD_SSH_EXTRA[@]}"
  # Replace the old tree (files deleted locally must disappear remotely) but keep the built .venv.
  script+="; mkdir -p $dir; find $dir -mindepth 1 -maxdepth 1 ! -name .venv -exec rm -rf {} +"
  script+="; tar -xzf $remote_tarball -C $dir; rm -f $remote_tarball"
  script+="; echo \"worker \$W: code unpacked into \$HOME/\"$dir"
elif ((do_code)); then
  url=$(gdsd_quote "$REPO_URL")
  ref=$(gdsd_quote "$REPO_REF")
  script+="; if [ -e $dir ] && [ ! -d $dir/.git ]; then echo \"worker \$W: error: ~/\"$dir\" exists and is not a git clone (remove it, or use CODE_MODE=copy)\" >&2; exit 1; fi"
  script+="; if [ ! -d $dir/.git ]; then git clone --quiet $url $dir; fi"
  # fetch + FETCH_HEAD: the same commands work for a branch, a tag or a commit id.
  script+="; git -C $dir fetch --quiet origin $ref; git -C $dir checkout --quiet --force --detach FETCH_HEAD"
  script+="; echo \"worker \$W: ~/\"$dir\" at \$(git -C $dir rev-parse HEAD)\""
fi

if ((do_env)); then
  py=$(gdsd_quote "$PYTHON_VERSION")
  script+="; cd $dir; export PATH=\"\$HOME/.local/bin:\$PATH\""
  # TPU VM images ship an older system Python; uv provides the pinned interpreter for the venv.
  script+="; if ! command -v uv >/dev/null 2>&1; then python3 -m pip install --user --quiet uv || python3 -m pip install --user --quiet --break-system-packages uv; fi"
  script+="; if [ ! -x .venv/bin/python ]; then uv venv --python $py .venv; fi"
  install="uv pip install --python .venv/bin/python"
  if [[ -n $CONSTRAINTS_FILE ]]; then
    cf=$(gdsd_quote "$CONSTRAINTS_FILE")
    script+="; if [ -f $cf ]; then $install -c $cf 'jax[tpu]' -e '.[gcs]'; else echo \"worker \$W: warning: \"$cf\" not found, installing without pinned constraints\" >&2; $install 'jax[tpu]' -e '.[gcs]'; fi"
  else
    script+="; $install 'jax[tpu]' -e '.[gcs]'"
  fi
  # Import only (no device use): touching the TPU here would need every worker in step.
  script+="; .venv/bin/python -c 'import sys, jax, gdsd_jax; print(\"python\", sys.version.split()[0], \"jax\", jax.__version__)' | sed \"s/^/worker \$W: /\""
fi

gdsd_ssh all "$script"
