#!/usr/bin/env bash
# Train (and evaluate) on one GPU host with all of its GPUs.
#
# Usage:
#   launch/gpu_host.sh [--dry_run] --config=CONFIG --workdir=DIR [more main.py flags...]
#   launch/gpu_host.sh --config=configs/gpt2_hh.py:gpt2-medium --workdir=runs/gpt2m_hh
#   launch/gpu_host.sh --config=configs/gpt2_hh.py --workdir=runs/x --mode=train --config.train.steps=500
#
# What it runs (one line; --dry_run prints it and runs nothing):
#   env XLA_FLAGS='<flags below> $XLA_FLAGS' $PYTHON -m gpt2_lora_jax.main --config=... --workdir=... [flags]
# Every argument other than --dry_run goes to gpt2_lora_jax.main unchanged. One process sees all
# local GPUs (restrict them with CUDA_VISIBLE_DEVICES); the config's mesh (mesh.data x mesh.fsdp)
# spreads the batch and parameters over them. No jax.distributed is needed on one host.
# Rerunning the same command resumes from the latest checkpoint in the workdir; on SIGTERM
# (Ctrl-C, kill) main.py saves a checkpoint and exits 143.
#
# XLA flags set here (useful on H100/H200, harmless on one GPU; yours in $XLA_FLAGS come after
# them and so win):
#   --xla_gpu_enable_latency_hiding_scheduler=true   schedule the gradient all-reduce (data) and
#       parameter all-gathers (fsdp) asynchronously so they overlap with compute.
#   --xla_gpu_enable_highest_priority_async_stream=true   run those collectives on a high-priority
#       stream, so compute kernels queued behind them do not delay them.
#
# Environment:
#   PYTHON       interpreter with the package installed (default: python3), e.g. .venv/bin/python
#   XLA_FLAGS    extra XLA flags, appended after the ones above
#   CUDA_VISIBLE_DEVICES, XLA_PYTHON_CLIENT_MEM_FRACTION, ... pass through as usual
set -euo pipefail

# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

GPU_XLA_FLAGS="--xla_gpu_enable_latency_hiding_scheduler=true --xla_gpu_enable_highest_priority_async_stream=true"

parse_args "$@"
main_args=("${args[@]}")
require_config_and_workdir "${main_args[@]}"

xla_flags="${GPU_XLA_FLAGS}${XLA_FLAGS:+ ${XLA_FLAGS}}"
command=(env "XLA_FLAGS=${xla_flags}" "${PYTHON:-python3}" -m gpt2_lora_jax.main "${main_args[@]}")
if (( dry_run )); then
  print_command "${command[@]}"
  exit 0
fi
exec "${command[@]}"
