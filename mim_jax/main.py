r"""Command-line entry point: flags in, one call to the trainer.

  python -m mim_jax.main --config=configs/mae_fmnist.py --workdir=/tmp/mae_fmnist \
      [--config.total_steps=100] [--config.model.dtype=bfloat16]

Running the same command again on the same workdir resumes from its latest checkpoint.
Evaluations use the same entry point: configs/linprobe_*.py and configs/finetune_*.py train
through the same loop, configs/knn_*.py runs the k-NN job (all with --config.init_from=DIR).

Multi-process runs start every process with the same command and the same --workdir; only
process 0 writes logs and pictures. Under SLURM (one task per GPU, `srun`) and on multi-host
Cloud TPU the processes find each other without flags (see mim_jax/distributed.py and
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
"""

from __future__ import annotations

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

from mim_jax.config_errors import ConfigError

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py[:arg]).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and pictures.")
flags.DEFINE_string("coordinator_address", "",
                    "Multi-process runs: HOST:PORT of process 0's coordinator service "
                    "(empty: detect SLURM / Cloud TPU, else a single process).")
flags.DEFINE_integer("num_processes", 0,
                     "Multi-process runs: the number of processes (0: detect).")
flags.DEFINE_integer("process_id", -1,
                     "Multi-process runs: this process's index in [0, num_processes) (-1: detect).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                      force=True)
  # Orbax reports every save step at INFO through absl; keep the console for our progress line.
  logging.getLogger("absl").setLevel(logging.WARNING)
  from mim_jax import distributed  # after flag parsing: keeps `--help` fast
  try:
    # Before anything touches JAX devices: the backend starts with the process group.
    distributed.maybe_initialize(FLAGS.coordinator_address, FLAGS.num_processes,
                                 FLAGS.process_id)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  from mim_jax import checkpoint, train
  from mim_jax.evaluate import knn_job
  try:
    if FLAGS.config.method == "knn":
      knn_job.run(FLAGS.config, FLAGS.workdir)
    else:
      train.run(FLAGS.config, FLAGS.workdir)
  except (ConfigError, checkpoint.WorkdirNotWritableError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
