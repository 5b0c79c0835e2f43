#!/usr/bin/env bash
# Runs the same training command on every worker of a Cloud TPU VM pod slice.
#
#   launch/tpu_pod.sh [--dry-run] [--create TYPE] TPU_NAME ZONE gs://BUCKET/tcl_run [--config.x=y ...]
#
#   --create TYPE  first create the slice (v4-32, v5e-16, v5p-..., v6e-...; gcloud's own names such
#                  as v5litepod-16 work too), copy this checkout's HEAD to every worker, install it
#                  there: ./setup.sh (needs Python >= 3.12 on the image), then the [tpu] extra
#                  (pip install -e ".[tpu]": jax with libtpu).
#   --dry-run      print the gcloud commands instead of running them.
#
# Env: CONFIG (default configs/tcl.py), REPO_DIR (checkout on the workers, default ~/tcl_jax),
#      PROJECT (gcloud project, optional), RUNTIME (TPU VM image for --create, default
#      tpu-ubuntu2204-base; v5e/v6e slices use v2-alpha-tpuv5-lite / v2-alpha-tpuv6e).
# The workdir must be visible to all workers (a GCS bucket or a shared filesystem): every process
# writes its part of each checkpoint. jax.distributed.initialize() finds the coordinator, process
# count and ids by itself on TPU. The mesh is configs/common.py's data x fsdp: all chips data
# parallel by default; e.g. 4-way data x 4-way FSDP on the 16 chips of a v4-32 or v5e-16:
#   launch/tpu_pod.sh my-tpu us-central2-b gs://b/run --config.mesh.shape='(4,4)'
# A maintenance event sends SIGTERM to every worker: the run checkpoints and exits; rerunning
# this command resumes from the latest checkpoint in the workdir.
set -euo pipefail
usage() {
  echo "usage: $0 [--dry-run] [--create TYPE] TPU_NAME ZONE WORKDIR [--config.x=y ...]" >&2
  exit 2
}
DRY_RUN=0 TYPE=""
while [[ $# -gt 0 && $1 == --* && $1 != --config* ]]; do
  case $1 in
    --dry-run) DRY_RUN=1; shift ;;
    --create) [[ $# -ge 2 ]] || usage; TYPE=$2; shift 2 ;;
    *) echo "$0: unknown option $1" >&2; usage ;;
  esac
done
[[ $# -ge 3 ]] || usage
TPU_NAME=$1 ZONE=$2 WORKDIR=$3
shift 3
CONFIG=${CONFIG:-configs/tcl.py}
REPO_DIR=${REPO_DIR:-tcl_jax}  # relative: under the worker's home
EXTRA=$(printf '%q ' "$@")
PROJECT_FLAG=()
[[ -n "${PROJECT:-}" ]] && PROJECT_FLAG=(--project="$PROJECT")

run() {  # a command, or its shell-quoted text under --dry-run
  if (( DRY_RUN )); then printf '%q ' "$@"; echo; else "$@"; fi
}

if [[ -n $TYPE ]]; then
  # User-facing names -> gcloud accelerator types (v5e is "v5litepod", v6e "v6e").
  case $TYPE in
    v5e-*) ACCEL=v5litepod-${TYPE#v5e-} ;;
    v4-*|v5p-*|v5litepod-*|v6e-*) ACCEL=$TYPE ;;
    *) echo "$0: unknown TPU type $TYPE (v4-N, v5e-N, v5p-N, v6e-N)" >&2; exit 2 ;;
  esac
  run gcloud compute tpus tpu-vm create "$TPU_NAME" --zone="$ZONE" "${PROJECT_FLAG[@]}" \
    --accelerator-type="$ACCEL" --version="${RUNTIME:-tpu-ubuntu2204-base}"
  # The committed tree (HEAD), not the working directory with its .venv.
  run git archive --format=tar.gz -o /tmp/tcl_jax.tgz HEAD
  run gcloud compute tpus tpu-vm scp /tmp/tcl_jax.tgz "$TPU_NAME:tcl_jax.tgz" --zone="$ZONE" \
    "${PROJECT_FLAG[@]}" --worker=all
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" "${PROJECT_FLAG[@]}" --worker=all \
    --command="mkdir -p $REPO_DIR && tar -xzf tcl_jax.tgz -C $REPO_DIR && cd $REPO_DIR && \
./setup.sh && .venv/bin/pip install -q -e '.[tpu]'"
fi

run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" "${PROJECT_FLAG[@]}" --worker=all \
  --command="cd $REPO_DIR && source .venv/bin/activate && \
python -m tcl_jax.main --config=$CONFIG --workdir=$WORKDIR --config.distributed.initialize=True $EXTRA"
