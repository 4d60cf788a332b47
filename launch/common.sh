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
