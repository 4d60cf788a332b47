#!/usr/bin/env bash
# Evaluate on one GPU host: sample answers and score them with the reward model, rescore, or
# run the PyTorch scorer alone on a generations file.
#
# Usage:
#   launch/eval_gpu.sh [--dry_run] eval   --config=CONFIG --workdir=DIR [more main.py flags...]
#   launch/eval_gpu.sh [--dry_run] score  --config=CONFIG --workdir=DIR [more main.py flags...]
#   launch/eval_gpu.sh [--dry_run] reward --generations=FILE --out=FILE [more reward.py flags...]
# --dry_run prints the command it would run and runs nothing.
#
# What each runs:
#   eval    $PYTHON -m gpt2_lora_jax.main --mode=eval ...   restore the latest (or eval.step)
#           checkpoint, sample base and fine-tuned answers, score them, write the report
#   score   $PYTHON -m gpt2_lora_jax.main --mode=score ...  score eval/step_N/generations.jsonl again
#           (e.g. after a scorer failure, or with --config.eval.reward_model=other) and rewrite
#           the report
#   reward  $PYTHON -m gpt2_lora_jax.reward --device=cuda ...  the scorer alone (flags
#           --generations --out --reward_model --batch_size --max_length --device --dtype);
#           a --device you pass comes later on the line and wins
# main.py modes run with XLA_PYTHON_CLIENT_PREALLOCATE=false: JAX then takes GPU memory as it
# needs it instead of 75% up front, so the PyTorch scorer process started after sampling has
# room on the same GPU. Set it to true yourself (or score on another GPU with CUDA_VISIBLE_DEVICES
# in a separate `reward` run) if sampling wants the memory.
#
# Environment:
#   PYTHON  interpreter with the package and the eval extra installed (default: python3)
#   XLA_PYTHON_CLIENT_PREALLOCATE (false), CUDA_VISIBLE_DEVICES, HF_HOME: pass through as usual
set -euo pipefail

# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

parse_args "$@"
subcommand="${args[0]:-}"
[[ -n "${subcommand}" ]] || usage
rest=("${args[@]:1}")
python="${PYTHON:-python3}"

require() {  # require FLAG...: each --FLAG=value (or --FLAG value) must be among the arguments
  local flag arg found
  for flag in "$@"; do
    found=0
    for arg in "${rest[@]}"; do
      if [[ "${arg}" == "--${flag}" || "${arg}" == "--${flag}="* ]]; then found=1; fi
    done
    if (( ! found )); then
      echo "error: ${subcommand} needs --${flag}=... (see launch/eval_gpu.sh --help)" >&2
      exit 2
    fi
  done
}

main_py() {  # main_py MODE: gpt2_lora_jax.main in that mode with the user's flags
  run env "XLA_PYTHON_CLIENT_PREALLOCATE=${XLA_PYTHON_CLIENT_PREALLOCATE:-false}" \
    "${python}" -m gpt2_lora_jax.main --mode="$1" "${rest[@]}"
}

case "${subcommand}" in
  eval|score)
    require config workdir
    main_py "${subcommand}"
    ;;
  reward)
    require generations out
    run "${python}" -m gpt2_lora_jax.reward --device=cuda "${rest[@]}"
    ;;
  *)
    echo "error: unknown subcommand '${subcommand}': use eval, score or reward" >&2
    exit 2
    ;;
esac
