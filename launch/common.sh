#!/usr/bin/env bash
# Shared by the launchers (sourced, not run): help text from a script's header, and printing a
# command the way --dry_run shows it.

# Prints the calling script's header comment (its documentation) and exits.
usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2
  exit 2
}

# Prints a command as one shell line that can be pasted back (words quoted only where needed).
print_command() {
  local word line=""
  for word in "$@"; do
    if [[ "${word}" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
      line+="${word} "
    else
      line+="'${word//\'/\'\\\'\'}' "
    fi
  done
  echo "${line% }"
}

# Sets dry_run (1 when --dry_run is given) and args (every other argument, in order);
# -h/--help prints the help.
parse_args() {
  # shellcheck disable=SC2034  # both are read by the scripts that source this file
  dry_run=0
  args=()
  local arg
  for arg in "$@"; do
    case "${arg}" in
      --dry_run) dry_run=1 ;;
      -h|--help) usage ;;
      *) args+=("${arg}") ;;
    esac
  done
}

# Runs a command, or only prints it under --dry_run.
run() {
  if (( dry_run )); then print_command "$@"; else "$@"; fi
}

# Exits with an error unless the arguments for main.py name --config and --workdir.
require_config_and_workdir() {
  local arg has_config=0 has_workdir=0
  for arg in "$@"; do
    case "${arg}" in
      --config|--config=*) has_config=1 ;;
      --workdir|--workdir=*) has_workdir=1 ;;
    esac
  done
  if (( ! has_config || ! has_workdir )); then
    echo "error: give --config=CONFIG and --workdir=DIR (see $0 --help)" >&2
    exit 2
  fi
}
