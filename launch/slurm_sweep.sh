#!/usr/bin/env bash
# Submit a sweep (gpt2_lora_jax/sweep.py) to SLURM: the base first, then one array task per run,
# then the report. Each array task is an ordinary run in WORKDIR/runs/<name>, submitted through
# launch/slurm.sbatch (one process per GPU, checkpoint and requeue before the time limit).
#
# Usage:
#   launch/slurm_sweep.sh [--dry_run] --config=SWEEP_CONFIG --workdir=SHARED_DIR [more main.py flags...]
#   NODES=1 GPUS_PER_NODE=8 TIME=12:00:00 PARTITION=h100 MAX_PARALLEL=4 \
#       launch/slurm_sweep.sh --config=configs/demo_sweep.py --workdir=/shared/sweeps/demo
#
# What it runs (--dry_run prints the three sbatch lines, the job ids as $BASE_JOB and $ARRAY_JOB):
#   1. PYTHON -m gpt2_lora_jax.main ARGS --mode=sweep_plan   (here: how many runs, N)
#   2. sbatch --parsable ... launch/slurm.sbatch ARGS --mode=sweep --config.sweep.task=base
#      (pre-trains the base if the config does, and evaluates it once)
#   3. sbatch --parsable --array=0-(N-1)[%MAX_PARALLEL] --dependency=afterok:$BASE_JOB ...
#      launch/slurm.sbatch ARGS --mode=sweep --config.sweep.task=slurm_array
#      (task K trains and evaluates run K: main reads $SLURM_ARRAY_TASK_ID)
#   4. sbatch --dependency=afterany:$ARRAY_JOB --nodes=1 --ntasks-per-node=1 ...
#      launch/slurm.sbatch ARGS --mode=sweep_report   (the comparison of the runs that finished)
# Submitting the same command again resubmits all three; finished runs are skipped, stopped ones
# resume, and a config that changes a finished run is refused by each task in one line.
#
# Environment: as launch/slurm.sh (NODES, GPUS_PER_NODE, CPUS_PER_TASK, TIME, JOB_NAME, SIGNAL_LEAD,
#   PARTITION, ACCOUNT, QOS, SBATCH_EXTRA, PYTHON, XLA_FLAGS), applied to the base job and every
#   array task; MAX_PARALLEL (unset: no limit) caps the array tasks running at once; REPORT_TIME
#   (00:30:00) is the report job's limit.
set -euo pipefail

# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

script_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

parse_args "$@"
main_args=("${args[@]}")
require_config_and_workdir "${main_args[@]}"
for arg in "${main_args[@]}"; do
  case "${arg}" in
    --mode|--mode=*|--config.sweep.task|--config.sweep.task=*)
      echo "error: ${arg}: this script sets --mode and --config.sweep.task itself" >&2
      exit 2 ;;
  esac
done

python="${PYTHON:-python3}"
plan="$("${python}" -m gpt2_lora_jax.main "${main_args[@]}" --mode=sweep_plan)"
n_runs="$(sed -n 's/^runs: //p' <<< "${plan}")"
if [[ ! "${n_runs}" =~ ^[0-9]+$ ]] || (( n_runs < 1 )); then
  echo "error: could not read the number of runs from --mode=sweep_plan:" >&2
  echo "${plan}" >&2
  exit 2
fi

gpus_per_node="${GPUS_PER_NODE:-8}"
job_name="${JOB_NAME:-gpt2-lora-sweep}"
sbatch_args=(--nodes="${NODES:-1}"
             --ntasks-per-node="${gpus_per_node}"  # one process per GPU
             --gpus-per-node="${gpus_per_node}"
             --cpus-per-task="${CPUS_PER_TASK:-8}"
             --time="${TIME:-04:00:00}"
             --signal="B:USR1@${SIGNAL_LEAD:-300}")
common=()
if [[ -n "${PARTITION:-}" ]]; then common+=(--partition="${PARTITION}"); fi
if [[ -n "${ACCOUNT:-}" ]]; then common+=(--account="${ACCOUNT}"); fi
if [[ -n "${QOS:-}" ]]; then common+=(--qos="${QOS}"); fi
if [[ -n "${SBATCH_EXTRA:-}" ]]; then
  read -r -a extra <<< "${SBATCH_EXTRA}"
  common+=("${extra[@]}")
fi
array="0-$(( n_runs - 1 ))${MAX_PARALLEL:+%${MAX_PARALLEL}}"
batch="${script_dir}/slurm.sbatch"

base=(sbatch --parsable --job-name="${job_name}-base" "${sbatch_args[@]}" "${common[@]}"
      "${batch}" "${main_args[@]}" --mode=sweep --config.sweep.task=base)
runs=(sbatch --parsable --job-name="${job_name}" --array="${array}" "${sbatch_args[@]}" "${common[@]}")
report=(sbatch --parsable --job-name="${job_name}-report" --nodes=1 --ntasks-per-node=1
        --gpus-per-node=1 --time="${REPORT_TIME:-00:30:00}" "${common[@]}")
run_tail=("${batch}" "${main_args[@]}" --mode=sweep --config.sweep.task=slurm_array)
report_tail=("${batch}" "${main_args[@]}" --mode=sweep_report)

if (( dry_run )); then
  echo "# ${n_runs} runs (--mode=sweep_plan):"
  while IFS= read -r line; do echo "#   ${line}"; done <<< "${plan}"
  print_command "${base[@]}"
  # shellcheck disable=SC2016  # the job ids are placeholders, printed as written
  print_command "${runs[@]}" '--dependency=afterok:$BASE_JOB' "${run_tail[@]}"
  # shellcheck disable=SC2016
  print_command "${report[@]}" '--dependency=afterany:$ARRAY_JOB' "${report_tail[@]}"
  exit 0
fi
base_job="$("${base[@]}")"
array_job="$("${runs[@]}" --dependency="afterok:${base_job%%;*}" "${run_tail[@]}")"
report_job="$("${report[@]}" --dependency="afterany:${array_job%%;*}" "${report_tail[@]}")"
echo "submitted: base ${base_job}, runs ${array_job} (array ${array}), report ${report_job}"
