#!/usr/bin/env bash
# Cloud TPU VM pods: create a pod slice, install this repo on every worker, train, delete.
#
# Usage:
#   launch/tpu_pod.sh [--dry_run] create
#   launch/tpu_pod.sh [--dry_run] setup
#   launch/tpu_pod.sh [--dry_run] run --config=CONFIG [--workdir=gs://...] [more main.py flags...]
#   launch/tpu_pod.sh [--dry_run] delete
# --dry_run prints the gcloud (and git) commands it would run, and runs nothing.
#
# A whole session:
#   export TPU_NAME=gpt2-lora ZONE=us-central2-b PROJECT=my-project BUCKET=my-bucket
#   export ACCELERATOR_TYPE=v4-32 RUNTIME_VERSION=tpu-ubuntu2204-base SPOT=1
#   python -m gpt2_lora_jax.tfds_source --data_dir=gs://my-bucket/tfds \
#       --files=train=hh/train.jsonl.gz --files=test=hh/test.jsonl.gz    # stage the rows once
#   launch/tpu_pod.sh create && launch/tpu_pod.sh setup
#   launch/tpu_pod.sh run --config=configs/gpt2_hh.py:gpt2-xl --mode=train \
#       --config.data.source=tfds --config.data.tfds_dir=gs://my-bucket/tfds
#   launch/tpu_pod.sh delete
#
# What each subcommand runs:
#   create  gcloud compute tpus tpu-vm create $TPU_NAME --zone --accelerator-type
#           --version=$RUNTIME_VERSION [--project] [--spot | --preemptible]
#   setup   copies the repo to every worker and installs it there:
#           with REPO_URL: ssh --worker=all 'git clone REPO_URL (or fetch) && git checkout GIT_REF';
#           without: git archive HEAD (the committed tree; commit first) to a tarball, then
#           tpu-vm scp --worker=all and ssh --worker=all to unpack it into $REMOTE_DIR;
#           then, on every worker: python3 -m pip install -e '.[$EXTRAS]'
#   run     tpu-vm ssh --worker=all --command='cd $REMOTE_DIR && python3 -m gpt2_lora_jax.main ...'
#           The same command runs on every worker at once (one process per host, each driving its
#           local TPU chips); jax.distributed initialises itself from the TPU metadata. The workdir
#           must be a gs:// path every worker shares (default gs://$BUCKET/runs/$TPU_NAME);
#           rerunning `run` after a preemption (recreate + setup first if the slice was reclaimed)
#           resumes from its latest checkpoint.
#   delete  gcloud compute tpus tpu-vm delete $TPU_NAME --zone [--project] --quiet
#
# Environment:
#   TPU_NAME, ZONE (required); PROJECT (default: gcloud's configured project);
#   ACCELERATOR_TYPE (v4-32), RUNTIME_VERSION (tpu-ubuntu2204-base; v5p: v2-alpha-tpuv5,
#   v5e: v2-alpha-tpuv5-lite, v6e: v2-alpha-tpuv6e); SPOT=1 or PREEMPTIBLE=1 for cheaper, reclaimable
#   capacity; BUCKET (for the default workdir); REPO_URL and GIT_REF (main) to clone instead of
#   copying; REMOTE_DIR (gpt2-lora-jax, relative to the worker's home); EXTRAS (tpu,tfds: the tfds
#   extra reads staged rows from gs://; add eval to score on the workers, which installs torch).
#
# Runs with bash 3.2 (macOS) too: it is started from a workstation, not from the workers.
set -euo pipefail

# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

# Quotes one word for the remote shell that runs an ssh --command.
remote_quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then printf '%s' "$1"; else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}

parse_args "$@"
subcommand="${args[0]:-}"
[[ -n "${subcommand}" ]] || usage
rest=("${args[@]:1}")

: "${TPU_NAME:?set TPU_NAME (the pod slice name)}"
: "${ZONE:?set ZONE (e.g. us-central2-b)}"
location=(--zone="${ZONE}")
if [[ -n "${PROJECT:-}" ]]; then location+=(--project="${PROJECT}"); fi
remote_dir="${REMOTE_DIR:-gpt2-lora-jax}"

on_all_workers() {  # runs a shell command line on every worker of the slice
  run gcloud compute tpus tpu-vm ssh "${TPU_NAME}" "${location[@]}" --worker=all --command="$1"
}

case "${subcommand}" in
  create)
    capacity=()
    if [[ "${SPOT:-0}" == 1 ]]; then capacity=(--spot)
    elif [[ "${PREEMPTIBLE:-0}" == 1 ]]; then capacity=(--preemptible); fi
    run gcloud compute tpus tpu-vm create "${TPU_NAME}" "${location[@]}" \
      --accelerator-type="${ACCELERATOR_TYPE:-v4-32}" \
      --version="${RUNTIME_VERSION:-tpu-ubuntu2204-base}" ${capacity[@]+"${capacity[@]}"}
    ;;
  setup)
    extras="${EXTRAS:-tpu,tfds}"
    install="cd $(remote_quote "${remote_dir}") && python3 -m pip install -U pip && python3 -m pip install -e $(remote_quote ".[${extras}]")"
    if [[ -n "${REPO_URL:-}" ]]; then
      ref="$(remote_quote "${GIT_REF:-main}")"
      dir="$(remote_quote "${remote_dir}")"
      on_all_workers "(test -d ${dir}/.git || git clone $(remote_quote "${REPO_URL}") ${dir}) && git -C ${dir} fetch --all --quiet && git -C ${dir} checkout ${ref} && (git -C ${dir} pull --ff-only --quiet || true) && ${install}"
    else
      repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
      tarball="/tmp/gpt2-lora-jax-${TPU_NAME}.tar.gz"
      run git -C "${repo_root}" archive --format=tar.gz --output="${tarball}" HEAD
      run gcloud compute tpus tpu-vm scp "${tarball}" "${TPU_NAME}:gpt2-lora-jax.tar.gz" "${location[@]}" --worker=all
      on_all_workers "mkdir -p $(remote_quote "${remote_dir}") && tar -xzf gpt2-lora-jax.tar.gz -C $(remote_quote "${remote_dir}") && ${install}"
    fi
    ;;
  run)
    has_config=0
    has_workdir=0
    for arg in ${rest[@]+"${rest[@]}"}; do
      case "${arg}" in
        --config=*) has_config=1 ;;
        --workdir=*) has_workdir=1
          if [[ "${arg}" != --workdir=gs://* ]]; then
            echo "error: ${arg}: the workdir must be a gs:// path that every worker shares" >&2
            exit 2
          fi ;;
      esac
    done
    if (( ! has_config )); then
      echo "error: run needs --config=CONFIG (a path inside the repo on the workers)" >&2
      exit 2
    fi
    if (( ! has_workdir )); then
      : "${BUCKET:?set BUCKET or pass --workdir=gs://...}"
      rest+=("--workdir=gs://${BUCKET}/runs/${TPU_NAME}")
    fi
    line="cd $(remote_quote "${remote_dir}") && python3 -m gpt2_lora_jax.main"
    for arg in "${rest[@]}"; do line+=" $(remote_quote "${arg}")"; done
    on_all_workers "${line}"
    ;;
  delete)
    run gcloud compute tpus tpu-vm delete "${TPU_NAME}" "${location[@]}" --quiet
    ;;
  *)
    echo "error: unknown subcommand '${subcommand}': use create, setup, run or delete" >&2
    exit 2
    ;;
esac
