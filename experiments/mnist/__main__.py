"""`python -m experiments.mnist --workdir=runs/mnist [--config.learning_rate=3e-4 ...]`.

OpenBLAS, which JAX's CPU `slogdet` (exact evaluation) calls into, is limited to one thread
unless OPENBLAS_NUM_THREADS is set: its spinning threads otherwise fight XLA's thread pool
(see experiments/scaling/__main__.py).
"""

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # Before JAX loads LAPACK.

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags
import jax
from ml_collections import config_flags

from experiments.mnist import parallel
from experiments.mnist import train

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, TensorBoard events and samples.")
flags.DEFINE_enum("mode", "train", ["train", "evaluate"],
                  "train: train (resuming if the workdir has a checkpoint), then test the best "
                  "checkpoint; evaluate: only test the best checkpoint.")
config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(__file__), "configs", "default.py"), "Training configuration file.", lock_config=True
)
flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  parallel.initialize_distributed(FLAGS.config)
  if FLAGS.mode == "train":
    metrics = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  else:
    metrics = train.evaluate_best(FLAGS.config, FLAGS.workdir)
  if jax.process_index() == 0:
    print(
        f"test LL {metrics['ll']:.2f} ± {metrics['ll_2se']:.2f} logit nats, "
        f"{metrics['bpd']:.4f} ± {metrics['bpd_2se']:.4f} bits/dim (best checkpoint, step {metrics['step']})"
    )


if __name__ == "__main__":
  app.run(main)
