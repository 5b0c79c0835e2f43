#!/usr/bin/env bash
# Runs the same training command on every worker of a Cloud TPU VM pod slice.
#
#   launch/tpu_pod.sh TPU_NAME ZONE gs://BUCKET/tcl_run [--config.x=y ...]
#
# Env: CONFIG (default configs/tcl.py), REPO_DIR (checkout on the workers, default ~/tcl_jax),
#      PROJECT (gcloud project, optional). The workdir must be visible to all workers (a GCS
#      bucket or a shared filesystem): every process writes its part of each checkpoint.
# jax.distributed.initialize() finds the coordinator, process count and ids by itself on TPU.
# A maintenance event sends SIGTERM to every worker: the run checkpoints and exits; rerunning
# this command resumes from the latest checkpoint in the workdir.
set -euo pipefail
if [[ $# -lt 3 ]]; then
  echo "usage: $0 TPU_NAME ZONE WORKDIR [--config.x=y ...]" >&2
  exit 2
fi
TPU_NAME=$1 ZONE=$2 WORKDIR=$3
shift 3
CONFIG=${CONFIG:-configs/tcl.py}
REPO_DIR=${REPO_DIR:-~/tcl_jax}
EXTRA=$(printf '%q ' "$@")
PROJECT_FLAG=()
[[ -n "${PROJECT:-}" ]] && PROJECT_FLAG=(--project="$PROJECT")

gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" "${PROJECT_FLAG[@]}" --worker=all \
  --command="cd $REPO_DIR && source .venv/bin/activate && \
    python -m tcl_jax.main --config=$CONFIG --workdir=$WORKDIR \
      --config.distributed.initialize=True $EXTRA"
