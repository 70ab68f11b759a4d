"""Scaling benchmark CLI.

    python -m experiments.scaling --output_dir=docs/scaling
    python -m experiments.scaling --widths=64,256,1024 --batch_sizes=100 --repetitions=3

Writes scaling.csv, scaling.md and scaling.png into --output_dir and prints the markdown table.

OpenBLAS is limited to one thread unless OPENBLAS_NUM_THREADS is set (by importing
`experiments`, see its docstring), so that the naive step's `slogdet` is measured at its best.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import pathlib

from absl import app
from absl import flags

from experiments.scaling import report
from experiments.scaling import timing

_DEFAULTS = timing.BenchmarkConfig()
FLAGS = flags.FLAGS if __name__ == "__main__" else flags.FlagValues()
"""This program's flags: absl's global ones when it runs, its own when imported, as by the tests,
where several programs share a process and define flags of the same names (--repetitions). Like
absl's global flags, those that a later `main(argv)` in the same process does not set keep their
values."""
flags.DEFINE_string(
  "output_dir",
  "runs/scaling",
  "Where scaling.csv, .md and .png go (docs/scaling holds the README's grid).",
  flag_values=FLAGS,
)
flags.DEFINE_list(
  "widths", [str(w) for w in _DEFAULTS.widths], "The D grid, comma-separated.", flag_values=FLAGS
)
flags.DEFINE_list(
  "batch_sizes",
  [str(b) for b in _DEFAULTS.batch_sizes],
  "The B grid, comma-separated.",
  flag_values=FLAGS,
)
flags.DEFINE_integer(
  "num_layers", _DEFAULTS.num_layers, "L, dense layers per flow.", flag_values=FLAGS
)
flags.DEFINE_integer(
  "spline_bins",
  _DEFAULTS.spline_bins,
  "K, bins of each spline of the `splines` method.",
  flag_values=FLAGS,
)
flags.DEFINE_float("alpha", _DEFAULTS.alpha, "Slope α of SmoothLeakyReLU(α).", flag_values=FLAGS)
flags.DEFINE_float(
  "learning_rate", _DEFAULTS.learning_rate, "Adam's learning rate.", flag_values=FLAGS
)
flags.DEFINE_integer(
  "repetitions", _DEFAULTS.repetitions, "Interleaved repetitions per point.", flag_values=FLAGS
)
flags.DEFINE_float(
  "min_repetition_s",
  _DEFAULTS.min_repetition_s,
  "Steps per repetition fill about this many seconds (at least one).",
  flag_values=FLAGS,
)
flags.DEFINE_float(
  "time_cap_s",
  _DEFAULTS.time_cap_s,
  "Skip a method at larger D once its step would exceed this.",
  flag_values=FLAGS,
)
flags.DEFINE_integer(
  "fit_min_width",
  _DEFAULTS.fit_min_width,
  "The exponent of time ∝ D^k is fitted over D ≥ this.",
  flag_values=FLAGS,
)
flags.DEFINE_integer(
  "seed", _DEFAULTS.seed, "Seed of the data and the initial parameters.", flag_values=FLAGS
)


def _positive_integers(values: list[str]) -> bool:
  return all(value.isdigit() and int(value) > 0 for value in values)


for _grid in ("widths", "batch_sizes"):
  flags.register_validator(
    _grid, _positive_integers, "must be positive integers, comma-separated", FLAGS
  )


def parse_flags(argv: Sequence[str]) -> tuple[timing.BenchmarkConfig, pathlib.Path]:
  """The benchmark config and output directory from the command line `argv` (program name first)."""
  arguments = FLAGS(argv)[1:]
  if arguments:
    raise app.UsageError(f"Unexpected arguments: {arguments}")
  values = {
    field.name: FLAGS[field.name].value for field in dataclasses.fields(timing.BenchmarkConfig)
  }
  grids = {name: tuple(int(value) for value in values[name]) for name in ("widths", "batch_sizes")}
  return timing.BenchmarkConfig(**{**values, **grids}), pathlib.Path(FLAGS.output_dir)


def main(argv: Sequence[str]) -> None:
  """Runs the benchmark and prints the markdown report; `argv` is the command line."""
  config, output_dir = parse_flags(argv)
  measurements = timing.run_benchmark(config, log=lambda line: print(line, flush=True))
  print(report.write_reports(measurements, config, output_dir))


if __name__ == "__main__":
  app.run(main)
