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

# Dies for a mim_jax.main flag after `--` that the launcher sets itself or that the cluster's
# detection decides: absl keeps the last of a repeated flag, so a second --workdir or --config
# there would silently replace the one the launcher checked, and the process topology comes
# from SLURM or the TPU VM (jax.distributed's cluster detection).
refuse_launcher_flags() {
  local arg name
  for arg in "$@"; do
    [[ "$arg" =~ ^--?(config|workdir|coordinator_address|num_processes|process_id)(=|$) ]] \
      || continue
    name="${BASH_REMATCH[1]}"
    case $name in
      config|workdir) die "--$name after --: give it to the launcher itself (--$name=...)," \
                          "which checks it; after -- it would replace that one" ;;
      *) die "--$name after --: the launcher's processes find each other by the cluster's" \
             "detection; leave it out" ;;
    esac
  done
}
