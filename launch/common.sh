# Shared by the launch scripts (sourced, not run): help text and argument errors.

# Prints the calling script's header comment (its usage) to stderr.
usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2
}

die() {
  echo "error: $*" >&2
  exit 2
}

# Dies for an option written with '=' and nothing after it (`--python=`): an empty value would
# otherwise switch the setting off or pass an empty word on.
refuse_empty_value() {
  [[ "$1" != --*= ]] || die "$1 has no value (leave the option out for its default)"
}
