r"""Command-line entry point: flags in, one call to the trainer.

  python -m mim_jax.main --config=configs/mae_fmnist.py --workdir=/tmp/mae_fmnist \
      [--config.total_steps=100] [--config.model.dtype=bfloat16]

Running the same command again on the same workdir resumes from its latest checkpoint.
Evaluations use the same entry point: configs/linprobe_*.py and configs/finetune_*.py train
through the same loop, configs/knn_*.py runs the k-NN job (all with --config.init_from=DIR).
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
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                      force=True)
  # Orbax reports every save step at INFO through absl; keep the console for our progress line.
  logging.getLogger("absl").setLevel(logging.WARNING)
  from mim_jax import checkpoint, train  # after flag parsing: keeps `--help` fast
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
