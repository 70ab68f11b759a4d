"""flax_relgrad's shipped MNIST configs against flowjax's best MNIST flow, at equal wall-clock.

    python -m experiments.flowjax_benchmark --workdir=runs/flowjax_benchmark \\
        --manual_dir=../shared/datasets/mnist --output_dir=docs/flowjax_benchmark

For each budget T (`--budgets`, minutes) flax_relgrad runs the config paired with it
(`--configs`, e.g. `spline16_15min`): a complete run of `python -m experiments.mnist`, in this
process, with start-up, training, evaluations and the test of its best-by-validation checkpoint
all on its clock. flowjax trains one masked autoregressive flow with spline transformers
(`maf.MafSettings`) on the same batches and dequantisation noise, and is tested on the same
test arrays whenever its clock (building, compiling, training) passes a budget. A flax_relgrad
run that takes longer than its budget is marked as over it. Then each library's final model
draws `--num_draws` samples, timed side by side (interleaved repetitions, medians): a MAF
samples in D sequential passes per layer, a dense flow in one.

Writes flowjax_benchmark.md and .json into --output_dir and prints the table. Needs flowjax
(`pip install -e ".[experiments,benchmark]"`).
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import importlib
import json
import os
import pathlib
import statistics
import time

from absl import app
from absl import flags
import equinox as eqx
import jax

import flax_relgrad as fr
from experiments import images
from experiments.flowjax_benchmark import maf
from experiments.scaling import timing
from experiments.training import data
from experiments.training import loop
from experiments.training import runs

_MAF = maf.MafSettings()
FLAGS = flags.FLAGS if __name__ == "__main__" else flags.FlagValues()
"""absl's global flags when run, its own when imported (as by the tests)."""
flags.DEFINE_string(
  "workdir", None, "Where the flax_relgrad runs go (one fresh folder each).", flag_values=FLAGS
)
flags.DEFINE_string(
  "output_dir", "docs/flowjax_benchmark", "Where the report goes.", flag_values=FLAGS
)
flags.DEFINE_list("budgets", ["5", "15", "60"], "Wall-clock budgets in minutes.", flag_values=FLAGS)
flags.DEFINE_list(
  "configs",
  ["spline16_5min", "spline16_15min", "spline4_60min"],
  "flax_relgrad's config for each budget, in the same order: names of experiments/mnist/configs.",
  flag_values=FLAGS,
)
flags.DEFINE_string("data_dir", "", 'tfds data_dir ("": tfds\' default).', flag_values=FLAGS)
flags.DEFINE_string(
  "manual_dir",
  "",
  "Folder with MNIST's four IDX files, to prepare tfds offline.",
  flag_values=FLAGS,
)
flags.DEFINE_bool("download", False, "Let tfds download MNIST.", flag_values=FLAGS)
flags.DEFINE_integer("maf_layers", _MAF.flow_layers, "flowjax: flow layers.", flag_values=FLAGS)
flags.DEFINE_integer("maf_width", _MAF.width, "flowjax: masked MLP width.", flag_values=FLAGS)
flags.DEFINE_integer("maf_knots", _MAF.knots, "flowjax: spline knots.", flag_values=FLAGS)
flags.DEFINE_float(
  "maf_learning_rate", _MAF.learning_rate, "flowjax: Adam's learning rate.", flag_values=FLAGS
)
flags.DEFINE_integer(
  "maf_batch_size", 100, "flowjax: batch size (its train steps per call: 10).", flag_values=FLAGS
)
flags.DEFINE_integer("num_draws", 16, "Samples per timed draw.", flag_values=FLAGS)
flags.DEFINE_integer("repetitions", 3, "Timed draws per library (interleaved).", flag_values=FLAGS)


@dataclasses.dataclass(frozen=True)
class ProjectRun:
  """One complete run of a shipped flax_relgrad config."""

  budget_minutes: float
  config: str
  minutes: float
  steps: int
  bpd: float
  bpd_2se: float


def _mnist_config(name: str):
  """The shipped config `experiments/mnist/configs/<name>.py`, reading data as the flags say."""
  try:
    module = importlib.import_module(f"experiments.mnist.configs.{name}")
  except ModuleNotFoundError as error:
    raise app.UsageError(f"--configs: experiments/mnist/configs has no {name}.py.") from error
  config = module.get_config()
  config.data_dir, config.manual_dir = FLAGS.data_dir, FLAGS.manual_dir
  config.download = FLAGS.download
  return config


def _fresh_workdir(name: str) -> str:
  workdir = os.path.join(FLAGS.workdir, name)
  if os.path.exists(workdir) and os.listdir(workdir):
    raise app.UsageError(
      f"{workdir} is not empty: a run there would resume, and its wall-clock would not be a "
      "complete run's. Remove it or pass another --workdir."
    )
  return workdir


def _run_name(budget_minutes: float, name: str) -> str:
  return f"flax_relgrad_{budget_minutes:g}min_{name}"


def run_project(budget_minutes: float, name: str) -> ProjectRun:
  """A complete run of the shipped config `name`, timed from start to test."""
  started = time.perf_counter()
  metrics = loop.train_and_evaluate(
    _mnist_config(name), _fresh_workdir(_run_name(budget_minutes, name))
  )
  minutes = (time.perf_counter() - started) / 60
  return ProjectRun(
    budget_minutes, name, minutes, int(metrics["step"]), metrics["bpd"], metrics["bpd_2se"]
  )


def draws_per_second(project: runs.TrainedRun, flow, num_draws: int, repetitions: int):
  """Median draws per second of each library's model, timed side by side."""
  relgrad_sample = jax.jit(
    lambda params, key: project.model.apply(
      {"params": params}, key, num_draws, method=fr.FlowMLP.sample
    )
  )
  flowjax_sample = eqx.filter_jit(lambda flow, key: flow.sample(key, (num_draws,)))
  key = jax.random.key(0)
  times = timing.interleaved_times(
    {
      "flax_relgrad": lambda: relgrad_sample(project.params, key),
      "flowjax": lambda: flowjax_sample(flow, key),
    },
    repetitions,
    {"flax_relgrad": 1, "flowjax": 1},
  )
  return {name: num_draws / statistics.median(seconds) for name, seconds in times.items()}


def report(
  project_runs: list[ProjectRun],
  checkpoints: list[maf.Checkpoint],
  maf_parameters: int,
  project_parameters: tuple[str, int],
  draws: dict[str, float],
) -> str:
  """The markdown table of the test bits/dim per budget, and the sampling speeds."""
  lines = [
    "| budget | flax_relgrad config | its wall-clock | flax_relgrad test bpd "
    "| flowjax MAF test bpd (epochs) at the budget |",
    "|---|---|---|---|---|",
  ]
  for run, checkpoint in zip(project_runs, checkpoints, strict=True):
    over = "" if run.minutes <= run.budget_minutes else " (over the budget)"
    lines.append(
      f"| {run.budget_minutes:g} min | `{run.config}` | {run.minutes:.1f} min{over} "
      f"| {run.bpd:.3f} ± {run.bpd_2se:.3f} "
      f"| {checkpoint.bpd:.3f} ± {checkpoint.bpd_2se:.3f} ({checkpoint.epochs:.1f}) |"
    )
  lines += [
    "",
    f"Parameters: flax_relgrad {project_parameters[1] / 1e6:.2f} M (`{project_parameters[0]}`), "
    f"flowjax {maf_parameters / 1e6:.2f} M. Sampling, {FLAGS.num_draws} draws per call, "
    f"median of {FLAGS.repetitions}: flax_relgrad {draws['flax_relgrad']:.1f} draws/s, "
    f"flowjax {draws['flowjax']:.2f} draws/s "
    f"({draws['flax_relgrad'] / draws['flowjax']:.0f}× faster with flax_relgrad).",
  ]
  return "\n".join(lines) + "\n"


def main(argv: Sequence[str]) -> None:
  """Runs both libraries, writes the report and prints it; `argv` is the command line, program
  name first."""
  arguments = FLAGS(argv)[1:]
  if arguments:
    raise app.UsageError(f"Unexpected arguments: {arguments}")
  if FLAGS.workdir is None:
    raise app.UsageError("--workdir is required (where the flax_relgrad runs go).")
  budgets = [float(minutes) for minutes in FLAGS.budgets]
  if len(budgets) != len(FLAGS.configs) or len(set(budgets)) != len(budgets):
    raise app.UsageError(
      f"--budgets {FLAGS.budgets} and --configs {FLAGS.configs}: pair each of distinct "
      "budgets with one config."
    )
  if not all(minutes > 0 for minutes in budgets):
    raise app.UsageError(f"--budgets must be positive minutes, got {FLAGS.budgets}.")
  # Checked before anything trains: a bad name or a used workdir found after an hour's run
  # would lose it.
  for minutes, name in zip(budgets, FLAGS.configs, strict=True):
    _mnist_config(name)
    _fresh_workdir(_run_name(minutes, name))
  project_runs = [run_project(b, name) for b, name in zip(budgets, FLAGS.configs, strict=True)]
  for run in project_runs:
    print(f"flax_relgrad {run.config}: {run.minutes:.2f} min, test {run.bpd:.4f} bits/dim")
  # flowjax on the data protocol of the longest budget's config (seed, λ).
  protocol = _mnist_config(FLAGS.configs[budgets.index(max(budgets))])
  protocol.batch_size, protocol.steps_per_call = FLAGS.maf_batch_size, 10
  source = images.ImageSource(protocol)
  test_y = data.eval_array(source, source.splits.test, protocol.seed, data.TEST_NOISE)
  settings = maf.MafSettings(
    flow_layers=FLAGS.maf_layers,
    width=FLAGS.maf_width,
    knots=FLAGS.maf_knots,
    learning_rate=FLAGS.maf_learning_rate,
  )
  checkpoints, flow = maf.train_against_clock(settings, source, protocol, test_y, budgets)
  by_budget = {checkpoint.mark_minutes: checkpoint for checkpoint in checkpoints}
  longest_run = max(project_runs, key=lambda run: run.budget_minutes)
  longest = runs.load_run(
    os.path.join(FLAGS.workdir, _run_name(longest_run.budget_minutes, longest_run.config))
  )
  draws = draws_per_second(longest, flow, FLAGS.num_draws, FLAGS.repetitions)
  table = report(
    project_runs,
    [by_budget[b] for b in budgets],
    maf.count_parameters(flow),
    (longest_run.config, maf.count_parameters(longest.params)),
    draws,
  )
  output = pathlib.Path(FLAGS.output_dir)
  output.mkdir(parents=True, exist_ok=True)
  (output / "flowjax_benchmark.md").write_text(table)
  record = {
    "flax_relgrad": [dataclasses.asdict(run) for run in project_runs],
    "flowjax": {
      "settings": dataclasses.asdict(settings),
      "batch_size": FLAGS.maf_batch_size,
      "checkpoints": [dataclasses.asdict(c) for c in checkpoints],
    },
    "draws_per_second": draws,
    "num_draws": FLAGS.num_draws,
  }
  (output / "flowjax_benchmark.json").write_text(json.dumps(record, indent=2) + "\n")
  print(table)


if __name__ == "__main__":
  app.run(main)
