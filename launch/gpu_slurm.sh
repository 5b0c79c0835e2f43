#!/usr/bin/env bash
# Multi-node GPU training under SLURM: one process per host, each driving all its local GPUs.
#
#   WORKDIR=/shared/tcl_run sbatch --nodes=2 launch/gpu_slurm.sh [--config.x=y ...]
#
# Env: WORKDIR (required; a filesystem shared by all nodes), CONFIG (default configs/tcl.py),
#      PORT (coordinator port, default 12345), VENV (default .venv in the submit directory).
# SLURM sends SIGTERM 120 s before the time limit (--signal); the run checkpoints and exits, and
# --requeue restarts the job, which resumes from the latest checkpoint in WORKDIR.
#SBATCH --job-name=tcl_jax
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --signal=TERM@120
#SBATCH --requeue
#SBATCH --output=%x-%j.out
set -euo pipefail
: "${WORKDIR:?set WORKDIR to a directory shared by all nodes}"
CONFIG=${CONFIG:-configs/tcl.py}
PORT=${PORT:-12345}
VENV=${VENV:-${SLURM_SUBMIT_DIR:-.}/.venv}
COORDINATOR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)

# The global batch (config.batch_size) is split over SLURM_NTASKS processes.
srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c '
  source "$0/bin/activate"
  exec python -m tcl_jax.main --config="$1" --workdir="$2" \
    --config.distributed.initialize=True \
    --config.distributed.coordinator_address="$3" \
    --config.distributed.num_processes="$SLURM_NTASKS" \
    --config.distributed.process_id="$SLURM_PROCID" \
    "${@:4}"
' "$VENV" "$CONFIG" "$WORKDIR" "$COORDINATOR:$PORT" "$@"
