"""The command line shared by every experiment: `python -m experiments.<name> --workdir=...`.

    python -m experiments.mnist --workdir=runs/mnist [--config=...] [--config.learning_rate=3e-4 ...]

`run(default_config)` defines the flags, with `--config` defaulting to that file, and runs.
"""

from absl import app
from absl import flags
import jax
from ml_collections import config_flags

from experiments.training import evaluation
from experiments.training import loop
from experiments.training import parallel


def run(default_config: str) -> None:
  """Defines the flags (`--config` defaulting to `default_config`) and runs the program."""
  flags.DEFINE_string(
    "workdir", None, "Directory for checkpoints, TensorBoard events and pictures."
  )
  flags.DEFINE_enum(
    "mode",
    "train",
    ["train", "evaluate", "layers"],
    "train: train (resuming if the workdir has a checkpoint), then test the best "
    "checkpoint; evaluate: only test the best checkpoint; layers: print the best "
    "checkpoint's log-likelihood terms per layer on the validation split.",
  )
  config_flags.DEFINE_config_file(
    "config", default_config, "Training configuration file.", lock_config=True
  )
  flags.mark_flags_as_required(["workdir"])

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
    parallel.initialize_distributed(config)
    if flags.FLAGS.mode == "layers":
      report = loop.report_layers(config, workdir)
      if jax.process_index() == 0:
        print(report)
      return
    if flags.FLAGS.mode == "train":
      metrics = loop.train_and_evaluate(config, workdir)
    else:
      metrics = loop.evaluate_best(config, workdir)
    if jax.process_index() == 0:
      print(f"test {evaluation.describe(metrics)} (best checkpoint, step {metrics['step']})")

  app.run(main)
