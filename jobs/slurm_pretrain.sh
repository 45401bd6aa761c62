#!/bin/bash
# CAN pre-training under SLURM: one task per GPU, started by srun (no ssh, no deepspeed launcher), requeued on
# preemption (status.json says "preempted"). Usage:
#   sbatch jobs/slurm_pretrain.sh jobs/configs/can_vit_large.yaml --set data.shards=s3://BUCKET/shards/manifest.parquet
# Preemption: SLURM sends SIGUSR1 to every task 180 s before the time limit (--signal) and SIGTERM on preemption;
# jobs/pretrain.py saves a checkpoint at the next step boundary and exits 0; the requeued job (same output_dir)
# resumes from it automatically.
#SBATCH --job-name=can-pretrain
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=24:00:00
#SBATCH --signal=USR1@180
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out

set -euo pipefail
CONFIG=${1:?usage: sbatch jobs/slurm_pretrain.sh CONFIG.yaml [--set key=value ...]}
shift

export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_PORT=${MASTER_PORT:-29500}
export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK}
# AWS_* (endpoint, credentials) come from the submitting environment; srun exports it to every task.
# Gloo (the preemption vote, the start-up agreement) binds the interface each rank's route to MASTER_ADDR leaves
# by (jobs/launch.py), unless GLOO_SOCKET_IFNAME is exported here: do so when the nodes reach each other on another.

# The rank variables torch.distributed reads, from SLURM's per-task ones (evaluated inside each task).
srun --kill-on-bad-exit=1 bash -c '
  export RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS LOCAL_RANK=$SLURM_LOCALID
  exec python jobs/pretrain.py --config "$0" "$@"
' "$CONFIG" "$@"

# A preempted or timed-out run saved a checkpoint and exited 0: put the job back in the queue to resume it.
OUT_DIR=$(python -c 'import sys; from jobs.config import load_config; print(load_config(sys.argv[1], [a for a in sys.argv[2:] if a != "--set"]).output_dir)' "$CONFIG" "$@")
if python -c 'import json, sys; sys.exit(json.load(open(sys.argv[1]))["outcome"] != "preempted")' "$OUT_DIR/status.json"; then
  scontrol requeue "$SLURM_JOB_ID"
fi
