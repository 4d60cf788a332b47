#!/usr/bin/env bash
# Submit launch/slurm.sbatch: multi-node training on SLURM, one process per GPU, requeued when
# preempted or near its time limit (see launch/slurm.sbatch for how and why).
#
# Usage:
#   launch/slurm.sh [--dry_run] --config=CONFIG --workdir=SHARED_DIR [more main.py flags...]
#   NODES=4 GPUS_PER_NODE=8 TIME=12:00:00 PARTITION=h100 \
#       launch/slurm.sh --config=configs/gpt2_hh.py:gpt2-xl --workdir=/shared/runs/gpt2xl \
#       --config.data.source=tfds --config.data.tfds_dir=/shared/tfds
#
# What it runs (--dry_run prints it, then, as comments, the srun line the job would run):
#   sbatch --job-name=... --nodes=$NODES --ntasks-per-node=$GPUS_PER_NODE
#          --gpus-per-node=$GPUS_PER_NODE --time=$TIME --signal=B:USR1@$SIGNAL_LEAD
#          [--partition=...] [--account=...] [--qos=...] [$SBATCH_EXTRA] launch/slurm.sbatch ARGS
# Arguments other than --dry_run go to gpt2_lora_jax.main unchanged. Submitting the same command
# again (or the automatic requeue) resumes from the latest checkpoint in the workdir.
#
# Environment:
#   NODES (1), GPUS_PER_NODE (8), CPUS_PER_TASK (8), TIME (04:00:00), JOB_NAME (gpt2-lora-jax),
#   SIGNAL_LEAD (300: seconds before the time limit at which the job checkpoints and requeues),
#   PARTITION, ACCOUNT, QOS (unset: the cluster's defaults), SBATCH_EXTRA (more sbatch options,
#   split on spaces), PYTHON and XLA_FLAGS (exported to the job; see launch/slurm.sbatch).
set -euo pipefail

# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

script_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

parse_args "$@"
main_args=("${args[@]}")
require_config_and_workdir "${main_args[@]}"

gpus_per_node="${GPUS_PER_NODE:-8}"
sbatch_args=(--job-name="${JOB_NAME:-gpt2-lora-jax}"
             --nodes="${NODES:-1}"
             --ntasks-per-node="${gpus_per_node}"  # one process per GPU
             --gpus-per-node="${gpus_per_node}"
             --cpus-per-task="${CPUS_PER_TASK:-8}"
             --time="${TIME:-04:00:00}"
             --signal="B:USR1@${SIGNAL_LEAD:-300}")
if [[ -n "${PARTITION:-}" ]]; then sbatch_args+=(--partition="${PARTITION}"); fi
if [[ -n "${ACCOUNT:-}" ]]; then sbatch_args+=(--account="${ACCOUNT}"); fi
if [[ -n "${QOS:-}" ]]; then sbatch_args+=(--qos="${QOS}"); fi
if [[ -n "${SBATCH_EXTRA:-}" ]]; then
  read -r -a extra <<< "${SBATCH_EXTRA}"
  sbatch_args+=("${extra[@]}")
fi

command=(sbatch "${sbatch_args[@]}" "${script_dir}/slurm.sbatch" "${main_args[@]}")
if (( dry_run )); then
  print_command "${command[@]}"
  echo "# on the allocation, the job runs:"
  echo "# $(bash "${script_dir}/slurm.sbatch" --dry_run "${main_args[@]}")"
  exit 0
fi
exec "${command[@]}"
