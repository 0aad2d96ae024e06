# Shared by the launch scripts (sourced, not run): help text and argument errors.

# Prints the calling script's header comment (its usage) to stderr.
usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2
}

die() {
  echo "error: $*" >&2
  exit 2
}
