"""Scaling benchmark CLI.

    python -m experiments.scaling --output_dir=docs/scaling
    python -m experiments.scaling --widths=64,256,1024 --batch_sizes=100 --repetitions=3

Writes scaling.csv, scaling.md and scaling.png into --output_dir and prints the markdown table.

OpenBLAS is limited to one thread unless OPENBLAS_NUM_THREADS is set (by importing
`experiments`, see its docstring), so that the naive step's `slogdet` is measured at its best.
"""

from __future__ import annotations

import argparse
import pathlib

from experiments.scaling import report
from experiments.scaling import timing


def _int_tuple(text: str) -> tuple[int, ...]:
  return tuple(int(item) for item in text.split(",") if item)


def parse_args(argv: list[str] | None = None) -> tuple[timing.BenchmarkConfig, pathlib.Path]:
  """The benchmark config and output directory from the command line."""
  defaults = timing.BenchmarkConfig()
  parser = argparse.ArgumentParser(
    prog="python -m experiments.scaling",
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  parser.add_argument("--output_dir", type=pathlib.Path, default=pathlib.Path("docs/scaling"))
  parser.add_argument(
    "--widths", type=_int_tuple, default=defaults.widths, help="comma-separated D grid"
  )
  parser.add_argument(
    "--batch_sizes", type=_int_tuple, default=defaults.batch_sizes, help="comma-separated B grid"
  )
  parser.add_argument("--num_layers", type=int, default=defaults.num_layers)
  parser.add_argument("--alpha", type=float, default=defaults.alpha)
  parser.add_argument("--learning_rate", type=float, default=defaults.learning_rate)
  parser.add_argument("--repetitions", type=int, default=defaults.repetitions)
  parser.add_argument(
    "--min_repetition_s",
    type=float,
    default=defaults.min_repetition_s,
    help="steps per repetition fill about this many seconds (at least one)",
  )
  parser.add_argument(
    "--time_cap_s",
    type=float,
    default=defaults.time_cap_s,
    help="skip a method at larger D once its step would exceed this",
  )
  parser.add_argument("--fit_min_width", type=int, default=defaults.fit_min_width)
  parser.add_argument("--seed", type=int, default=defaults.seed)
  args = vars(parser.parse_args(argv))
  output_dir = args.pop("output_dir")
  return timing.BenchmarkConfig(**args), output_dir


def main(argv: list[str] | None = None) -> None:
  config, output_dir = parse_args(argv)
  measurements = timing.run_benchmark(config, log=lambda line: print(line, flush=True))
  print(report.write_reports(measurements, config, output_dir))


if __name__ == "__main__":
  main()
