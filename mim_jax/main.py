r"""Command-line entry point: flags in, one call to the trainer.

  python -m mim_jax.main --config=configs/mae_fmnist.py [--workdir=/tmp/mae_fmnist] \
      [--config.total_steps=100] [--config.model.dtype=bfloat16]

Without --workdir the run lives in workdirs/<config file name> (printed at start-up).

Running the same command again on the same workdir resumes from its latest checkpoint.
Evaluations use the same entry point: configs/linprobe_*.py and configs/finetune_*.py train
through the same loop, configs/knn_*.py runs the k-NN job (all with --config.init_from=DIR).

Multi-process runs start every process with the same command and the same --workdir; only
process 0 writes logs and pictures. Under SLURM (one task per GPU, `srun`) and on multi-host
Cloud TPU the processes find each other without flags (see mim_jax/training/distributed.py and
launch/; MIM_JAX_DISTRIBUTED=1 in the environment forces JAX's own cluster detection,
MIM_JAX_DISTRIBUTED=0 turns it off); anywhere else pass all three of

  --coordinator_address=HOST:PORT  process 0's address and a free port, the same everywhere
  --num_processes=N                how many processes the run has
  --process_id=I                   this process's index, 0 .. N-1

e.g. two CPU processes on one machine:

  python -m mim_jax.main --config=configs/mae_vitb.py:runlocal --workdir=/tmp/mp \
      --coordinator_address=localhost:12355 --num_processes=2 --process_id=0 &
  python -m mim_jax.main --config=configs/mae_vitb.py:runlocal --workdir=/tmp/mp \
      --coordinator_address=localhost:12355 --num_processes=2 --process_id=1

Exit codes (mim_jax/training/run_errors.py): 0 finished; 1 a bug (traceback); 2 bad input found
before training (a flag, a config field, the workdir, a data file); 3 the loss stayed NaN/Inf
(config.max_consecutive_nonfinite steps); 4 checkpoint writes kept failing
(config.max_consecutive_failed_saves); 5 another process of a multi-process run died, so this
one stopped too (run the same command on every process to resume); 75 stopped after SIGTERM (a
preemption notice) with its checkpoint written (run the same command to continue).

The config file is a Python module and runs as code: only pass config files you trust.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import sys
from typing import NoReturn, Sequence

from absl import app, flags
from ml_collections import config_flags

from mim_jax.config import checks, files
from mim_jax.config.errors import (
  ConfigError,
  config_error,
  dotted_keys,
  extra_arguments_message,
  unknown_field_error,
)
from mim_jax.training import run_errors

FLAGS = flags.FLAGS

# `--config.a.b=v` / `--config.a.b v` / `--noconfig.a.b`: the dotted field an argument overrides.
_OVERRIDE = re.compile(r"^--?(?:no)?config\.([^=]+)")


def define_flags(flag_values: flags.FlagValues, argv: Sequence[str] | None = None) -> None:
  """Defines the command-line flags on `flag_values`; `argv` is the command line to parse
  (None: sys.argv), which ml_collections reads to define the `--config.*` override flags."""
  config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py[:arg]).",
                                  flag_values=flag_values, lock_config=True,
                                  sys_argv=None if argv is None else list(argv))
  flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and pictures "
                      "(default: workdirs/<config file name>).", flag_values=flag_values)
  flags.DEFINE_string("coordinator_address", "",
                      "Multi-process runs: HOST:PORT ([IPv6]:PORT) of process 0's coordinator "
                      "service, port 1..65535 (empty: detect SLURM / Cloud TPU, else a single "
                      "process).",
                      flag_values=flag_values)
  flags.DEFINE_integer("num_processes", 0,
                       "Multi-process runs: the number of processes (0: detect).",
                       flag_values=flag_values)
  flags.DEFINE_integer("process_id", -1,
                       "Multi-process runs: this process's index in [0, num_processes) (-1: "
                       "detect).", flag_values=flag_values)
  flags.DEFINE_string("cpu_devices", "auto",
                      "JAX CPU devices of this process (CPU runs): 'auto' = for encoders up to "
                      "256 wide one per usable core, as many as split the batches evenly (the "
                      "batch runs data parallel across the cores; "
                      "mim_jax/training/cpu_devices.py), else 1; or a count. XLA_FLAGS' "
                      "--xla_force_host_platform_device_count or JAX_NUM_CPU_DEVICES, when "
                      "set, wins.",
                      flag_values=flag_values)
  flags.DEFINE_bool("resume_with_changes", False,
                    "Resume a workdir's run although the config differs from the one it started "
                    "with (e.g. a lower lr after a divergence): the differences are logged and "
                    "appended to the workdir's config_changes.jsonl. Off: such a resume is "
                    "refused, naming the fields.", flag_values=flag_values)
  flags.mark_flags_as_required(["config"], flag_values=flag_values)


def _fail(message: str, code: int = run_errors.EXIT_BAD_INPUT) -> NoReturn:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(code)


def _config_path(argv: Sequence[str]) -> str | None:
  """The value of --config in `argv` (either `--config=PATH` or `--config PATH`)."""
  for i, arg in enumerate(argv):
    if re.match(r"^--?config=", arg):
      return arg.split("=", 1)[1]
    if re.match(r"^--?config$", arg) and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _unknown_overrides(argv: Sequence[str]) -> list[ConfigError]:
  """An error with "did you mean" suggestions for every `--config.x` naming no field.

  Loads the config file alone (no overrides) to learn its fields; [] if it cannot be loaded.
  """
  path = _config_path(argv)
  if path is None:
    return []
  try:
    file_config = files.load_config_file(path)
    known = set(dotted_keys(file_config))
  except Exception:  # pylint: disable=broad-except  # the original error is reported instead
    return []
  fields = [m.group(1) for m in map(_OVERRIDE.match, argv[1:]) if m]
  from mim_jax import registry  # only on this error path: keeps `--help` fast
  return [registry.unused_field_error(f, file_config.method) or unknown_field_error(f, known)
          for f in dict.fromkeys(fields) if f not in known]


def parse_flags(argv: Sequence[str], flag_values: flags.FlagValues = FLAGS) -> list[str]:
  """Parses `argv` into `flag_values`; a bad flag prints `error: ...` and exits with code 2.

  Covers values of the wrong type (`--config.seed=1.5`), unknown flags and config fields (with
  the fields they were probably meant to be) and config files that fail to load.
  """
  try:
    remaining = flag_values(list(argv))
    if "config" in flag_values:
      files.require_loaded(flag_values)
  except ConfigError as e:
    _fail(str(e))
  except flags.IllegalFlagValueError as e:
    message = files.load_error_message(_config_path(argv), e)
    if message is None:
      _fail_flag_error(argv, e)
    _fail(message)
  except Exception as e:  # pylint: disable=broad-except
    # Raised by the config file's own code as it loads (--config=README.md, a mistyped field
    # in the file): its error in one line, at the file's line. Anything else is a bug.
    message = files.load_error_message(_config_path(argv), e)
    if message:
      _fail(message)
    if not isinstance(e, (flags.Error, AttributeError, KeyError, TypeError, ValueError,
                          OSError)):
      raise
    _fail_flag_error(argv, e)
  if remaining[1:]:
    _fail(extra_arguments_message(remaining[1:]))
  return remaining


def _fail_flag_error(argv: Sequence[str], e: Exception) -> NoReturn:
  """A bad flag or override, with the fields it was probably meant to be."""
  unknown = _unknown_overrides(argv)
  if unknown:
    _fail("\n".join(str(u) for u in unknown))
  wrong_type = _wrong_type_error(argv, e)
  if wrong_type:
    _fail(str(wrong_type))
  message = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
  name = getattr(e, "flagname", "")
  if isinstance(e, flags.UnrecognizedFlagError) and "." in name:
    # `--confg.seed=3`: a mistyped prefix of a config override.
    message += f". Did you mean --config.{name.split('.', 1)[1]}?"
  _fail(f"{message}\nPass --helpfull for the flags; config fields are in "
        "mim_jax/config/defaults.py.")


# What an override of a field of each type takes (ml_collections parses the value as the
# type of the file's value, and says only "invalid literal for int() with base 10: '1.5'").
_TYPE_TAKES = {int: "a whole number (the field is an integer)",
               float: "a number (the field is a float)", bool: "True or False"}
# Fields of whole numbers with another way to ask for a fraction.
_WHOLE_NUMBER_HINTS = {
    "num_epochs": "For part of an epoch, --config.total_steps=N stops the run at step N (the "
                  "lr schedule keeps its num_epochs length).",
}


def _wrong_type_error(argv: Sequence[str], e: Exception) -> ConfigError | None:
  """`config.FIELD='VALUE' is invalid: <what the field takes>` for an override whose value
  does not parse as its field's type (`--config.num_epochs=1.5`); None for any other error."""
  found = re.match(r"flag --config\.([^=\s]+)=", str(e))
  if not isinstance(e, flags.IllegalFlagValueError) or not found:
    return None
  field = found.group(1)
  try:
    kind = type(checks.get(files.load_config_file(_config_path(argv)), field))
  except Exception:  # pylint: disable=broad-except  # no file config: absl's message stands
    return None
  if kind not in _TYPE_TAKES:
    return None
  given = None
  for i, arg in enumerate(argv):  # the last one given is the one parsed
    if arg.startswith(f"--config.{field}="):
      given = arg.split("=", 1)[1]
    elif arg == f"--config.{field}" and i + 1 < len(argv):
      given = argv[i + 1]
  if given is None:
    return None
  hint = _WHOLE_NUMBER_HINTS.get(field.rsplit(".", 1)[-1], "") if kind is int else ""
  return config_error(field, given, _TYPE_TAKES[kind], hint)


def run_from_flags(flag_values: flags.FlagValues, cpu_devices_auto: bool = True) -> None:
  """Starts the process group (if any) and the run the parsed flags describe.

  Exits with a message and the code of run_errors for bad input (2), a diverged run (3) and
  failed checkpoints (4); other exceptions are bugs and keep their traceback. Without
  `cpu_devices_auto` only an explicit --cpu_devices count changes the CPU device count.
  """
  from mim_jax.training import cpu_devices, distributed  # after flag parsing: fast `--help`
  workdir = workdir_of(flag_values)
  count = None
  try:
    # Before anything touches JAX devices: the backends start with the device count and the
    # process group.
    multi_process = distributed.initialize_args(
        flag_values.coordinator_address, flag_values.num_processes,
        flag_values.process_id) is not None
    if cpu_devices_auto or flag_values.cpu_devices != cpu_devices.AUTO:
      count = cpu_devices.configure(flag_values.cpu_devices, [flag_values.config],
                                    multi_process)
    distributed.maybe_initialize(flag_values.coordinator_address, flag_values.num_processes,
                                 flag_values.process_id)
  except ValueError as e:
    _fail(str(e))
  import jax
  if count is not None:  # (default_backend starts the backends: only when there is news)
    said = cpu_devices.report(count, flag_values.cpu_devices, jax.default_backend())
    if said is not None:
      logging.log(*said)

  from mim_jax import data, registry
  from mim_jax.training import checkpoint, loop, setup
  try:
    config = flag_values.config
    file_config = files.load_config_file(flag_values["config"].config_filename)
    setup.refuse_inert_overrides(config, file_config,
                                 config_flags.get_override_values(flag_values["config"]))
    # Settings that would do nothing: the config file's own (against the method's defaults),
    # then the overrides (against the file), so that an override switching a feature off
    # does not turn the file's settings for it into errors.
    registry.check_unread_fields(file_config)
    loop.run(config, workdir, file_config=file_config,
             resume_with_changes=flag_values.resume_with_changes)
  except (ConfigError, checkpoint.WorkdirNotWritableError, data.IdxFormatError,
          data.BadImageError) as e:
    _fail(str(e))
  except run_errors.Preempted as e:  # not an error: the checkpoint is written
    print(str(e), file=sys.stderr)
    sys.exit(e.exit_code)
  except run_errors.RunError as e:
    _fail(str(e), e.exit_code)
  except OSError as e:
    if e.errno not in (errno.ENOSPC, errno.EDQUOT):
      raise
    _fail(_storage_full_message(e, workdir), run_errors.EXIT_CHECKPOINT_FAILED)
  except jax.errors.JaxRuntimeError as e:
    if jax.process_count() > 1:
      _stop_after_lost_process(e, workdir)
    raise


def _storage_full_message(error: OSError, workdir: str) -> str:
  """One line for a write that found its storage full: the workdir's (a log, a picture,
  results; failed checkpoint writes are counted and reported by the Checkpointer) when the
  file is in it or unnamed, else the file's (a temporary folder, a cache)."""
  from mim_jax import storage
  from mim_jax.convert import our_weights
  latest = our_weights.latest_step(os.path.join(workdir, "checkpoints"))
  name = os.fspath(error.filename) if error.filename else ""
  where = f" writing {name}" if name else ""
  in_workdir = not name or storage.is_url(workdir) or storage.is_within(name, workdir)
  storage_of = f"the storage of {workdir}" if in_workdir else f"the storage of {name}"
  return (f"{storage_of} is full ({error.strerror or error}{where}); the latest complete "
          f"checkpoint in {workdir} is {'step ' + str(latest) if latest is not None else 'none'}"
          ": free space (or raise the quota), then run the same command to resume")


def _stop_after_lost_process(error: Exception, workdir: str) -> None:
  """Ends this process of a multi-process run whose collective failed: another process died.

  On CPU the collective fails at once (the peer's connection closes); on GPU and TPU, where a
  collective can wait for ever, JAX's coordination service ends every process once the dead
  one misses its heartbeats (jax.distributed's heartbeat_timeout_seconds, 100 s). Either way
  the cause gets one line here instead of a traceback. (A death noticed while a checkpoint save
  waits at its barrier across processes also ends with the coordination service's abort.)
  `os._exit`: a normal exit would wait at jax.distributed's shutdown barrier for the dead
  process until that timeout, then abort.
  The loop has already stopped its data workers and left its save in flight, which cannot
  complete without the dead process (its `finally`, after `Checkpointer.abandon`).
  """
  import jax

  from mim_jax.convert import our_weights
  latest = our_weights.latest_step(os.path.join(workdir, "checkpoints"))
  failed = run_errors.first_line(error, with_type=False)
  print(f"process {jax.process_index()} of {jax.process_count()} stops: a collective with the "
        f"other processes failed ({failed}), so another process of this run has most "
        f"likely died. The latest complete checkpoint in {workdir} is step {latest}: run the "
        "same command on every process to resume from it.", file=sys.stderr, flush=True)
  logging.shutdown()
  sys.stdout.flush()
  os._exit(run_errors.EXIT_PEER_LOST)


def workdir_of(flag_values: flags.FlagValues) -> str:
  """--workdir, or workdirs/<config file name> (announced) when it is not given."""
  if flag_values.workdir:
    # The shell leaves `~` in `--workdir=~/runs` as written (see setup.expand_home).
    return os.path.expanduser(flag_values.workdir)
  path, _, arg = flag_values["config"].config_filename.partition(":")
  name = os.path.splitext(os.path.basename(path))[0]
  suffix = "_" + "".join(c if c.isalnum() else "_" for c in arg) if arg else ""
  workdir = os.path.join("workdirs", name + suffix)
  print(f"workdir: {workdir} (pass --workdir to choose another)", file=sys.stderr)
  return workdir


def cli(argv: Sequence[str]) -> None:
  """`python -m mim_jax.main ARGS` in this process, with its own flags (tests, notebooks):
  cli(["mim_jax.main", "--config=...", "--workdir=..."]). Exits (SystemExit) on errors. The
  process's JAX may already run (or run other work later), so its CPU device count changes
  only with an explicit --cpu_devices count."""
  flag_values = flags.FlagValues()
  define_flags(flag_values, argv)
  parse_flags(argv, flag_values)
  run_from_flags(flag_values, cpu_devices_auto=False)


def main(argv):
  del argv
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                      force=True)
  # Orbax reports every save step at INFO through absl; keep the console for our progress line.
  logging.getLogger("absl").setLevel(logging.WARNING)
  logging.getLogger("gcsfs").setLevel(logging.WARNING)  # a line per file read of a gs:// run
  # JAX probes for a TPU on every start and logs the failure ("Failed to open libtpu.so") at
  # INFO: on CPU and GPU machines that is expected, not news.
  logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
  from mim_jax.training import malloc_tunables, orbax_noise
  malloc_tunables.log_if_tuned()
  # For the whole program (the Checkpointer quiets it while open): the last of Orbax's noise
  # after a failed write comes at exit. Not in cli(), which leaves its process as it was.
  orbax_noise.start()
  run_from_flags(FLAGS)


if __name__ == "__main__":
  from mim_jax.training import malloc_tunables  # first: glibc reads its settings at start-up
  malloc_tunables.reexec_with_tunables("mim_jax.main")
  # Defined here, not at import: importing mim_jax.main (cli(), run_from_flags) leaves the
  # process's global absl flags to the program that imports it.
  define_flags(FLAGS)
  app.run(main, flags_parser=parse_flags)
