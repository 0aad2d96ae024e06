# Shared by the docs scripts (sourced, not run): their one argument, the check of their
# word-list settings, and a command that gets the script's signals.

# output_dir USAGE DEFAULT "$@": prints the output folder the script was given (relative to
# where the command runs) or DEFAULT (relative to the repository); an option or a second
# argument prints USAGE to stderr and exits 2. Call it before the script changes directory.
output_dir() {
  local usage=$1 default=$2; shift 2
  if [ $# -gt 1 ] || [[ ${1:-} == -* ]]; then
    echo "usage: $usage" >&2
    exit 2
  fi
  if [ -z "${1:-}" ]; then
    echo "$default"
  elif [[ $1 == /* ]]; then
    echo "$1"
  else
    echo "$PWD/$1"
  fi
}

# The methods of the results scripts' methods section (docs/fmnist_results.sh, docs/fmnist_gpu.sh).
FMNIST_METHODS="maskfeat beit simmim data2vec ibot data2vec2 maskdistill"

# each_one_of NAME "ALLOWED ..." VALUE...: exits 2 unless there is a VALUE and every one is one
# of the ALLOWED words (a misspelt or blank one would run nothing, or something else, and end
# with success).
# LIST WORD: WORD is one of LIST's words, separated by any whitespace (a list may span lines).
listed() { [[ " ${1//[[:space:]]/ } " == *" $2 "* ]]; }

each_one_of() {
  local name=$1 allowed value
  allowed=$(echo $2)  # one line, single spaces
  shift 2
  [ $# -gt 0 ] || { echo "$name: empty (one or more of: $(echo $allowed | sed 's/ /, /g'))" >&2
                    exit 2; }
  for value in "$@"; do
    listed "$allowed" "$value" || {
      echo "$name: unknown '$value' (one of: $(echo $allowed | sed 's/ /, /g'))" >&2
      exit 2; }
  done
}

# run_passing_signals COMMAND...: runs COMMAND in the background with this script's SIGTERM and
# SIGINT passed on to it as a SIGTERM (a foreground command would outlive a SIGTERM to the
# script, and a background job of a script ignores SIGINT); the trap is armed before the start.
# Returns COMMAND's status; STOPPED is 1 when a signal was passed on.
run_passing_signals() {
  local pid="" status
  STOPPED=0
  trap 'STOPPED=1; [ -n "$pid" ] && kill -TERM "$pid" 2> /dev/null' TERM INT
  "$@" < /dev/null &
  pid=$!
  ((STOPPED)) && kill -TERM "$pid" 2> /dev/null
  wait_for_exit "$pid"; status=$?
  trap - TERM INT
  return "$status"
}

# wait_for_exit PID: returns the status of background job PID once it has exited (a trapped
# signal cuts a plain `wait` short with status > 128 while the job runs on).
wait_for_exit() {
  local status
  while :; do
    wait "$1"; status=$?
    kill -0 "$1" 2> /dev/null || return "$status"
  done
}

# drawing_methods METHOD...: those of the METHODs whose configs/METHOD_fmnist.py draws pictures
# (has viz_every), space-separated; one Python start for all of them.
drawing_methods() {
  python -c "import sys; from mim_jax.config import files
print(' '.join(m for m in sys.argv[1:]
               if 'viz_every' in files.load_config_file(f'configs/{m}_fmnist.py')))" "$@"
}
