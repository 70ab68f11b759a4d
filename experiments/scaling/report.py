"""The scaling benchmark's reports: scaling.csv, scaling.md (times, ratios, fitted exponents,
memory) and scaling.png (`plot`), from the measurements of `timing.run_benchmark`."""

from __future__ import annotations

from collections.abc import Iterable
from collections.abc import Sequence
import csv
import math
import pathlib

import numpy as np

from experiments.scaling import models
from experiments.scaling import plot
from experiments.scaling import timing

MEMORY_SOURCE = "compiled executable: argument + output + temp − aliased (donated) bytes"


def fitted_exponent(points: Iterable[timing.Measurement], min_width: int) -> float:
  """k of median time ∝ D^k by least squares in log-log over measured points with D ≥ min_width."""
  kept = [(m.width, m.median_s) for m in points if not m.skipped and m.width >= min_width]
  if len(kept) < 2:
    return math.nan
  widths, times = np.log(np.array(kept, dtype=np.float64)).T
  return float(np.polyfit(widths, times, 1)[0])


def write_csv(measurements: Sequence[timing.Measurement], path: pathlib.Path) -> None:
  """One row per (method, B, D): status, median / quartiles / min / max seconds, memory."""
  with open(path, "w", newline="") as file:
    writer = csv.writer(file)
    writer.writerow(
      [
        "method",
        "batch",
        "width",
        "status",
        "median_s",
        "q25_s",
        "q75_s",
        "min_s",
        "max_s",
        "samples",
        "memory_bytes",
        "params_finite",
        "params_changed",
        "note",
      ]
    )
    for m in measurements:
      writer.writerow(
        [
          m.method,
          m.batch,
          m.width,
          "skipped" if m.skipped else "ok",
          f"{m.median_s:.6g}",
          f"{m.quantile_s(0.25):.6g}",
          f"{m.quantile_s(0.75):.6g}",
          f"{min(m.times_s, default=math.nan):.6g}",
          f"{max(m.times_s, default=math.nan):.6g}",
          len(m.times_s),
          "" if m.memory_bytes is None else m.memory_bytes,
          m.params_finite,
          m.params_changed,
          m.skip_reason,
        ]
      )


def _ratio(numerator: timing.Measurement, denominator: timing.Measurement) -> str:
  if numerator.skipped or denominator.skipped:
    return "–"
  return f"{numerator.median_s / denominator.median_s:.2f}"


def _milliseconds(m: timing.Measurement) -> str:
  return "skipped" if m.skipped else f"{1e3 * m.median_s:.3f}"


def _mebibytes(m: timing.Measurement) -> str:
  return "–" if m.memory_bytes is None or m.skipped else f"{m.memory_bytes / 2**20:.1f}"


def markdown_report(
  measurements: Sequence[timing.Measurement], config: timing.BenchmarkConfig
) -> str:
  """Time table with ratios, fitted exponents and memory table, as markdown."""
  by_key = {(m.method, m.batch, m.width): m for m in measurements}
  points = sorted({(m.batch, m.width) for m in measurements})
  batches = sorted({batch for batch, _ in points})
  lines = [
    "# Training-step time against the width D",
    "",
    f"Device: {timing.device_label()}. FlowMLP / LUFlow with {config.num_layers} layers "
    f"(`splines`: {config.spline_bins}-bin splines before each), "
    f"SmoothLeakyReLU({config.alpha:g}), float32, Adam({config.learning_rate:g}); one jitted "
    "step = gradient + optimizer update (compile and warm-up excluded). Median over "
    f"{config.repetitions} interleaved repetitions, each ≥ 1 step and ≈ ≥ "
    f"{config.min_repetition_s:g} s. "
    f"Points whose step is predicted or seen to exceed {config.time_cap_s:g} s are skipped.",
    "",
    "## Median milliseconds per step",
    "",
    "| B | D | "
    + " | ".join(models.METHODS)
    + " | splines/relative | naive/relative | relative/plain | lu/relative |",
    "|---:|---:|" + "---:|" * (len(models.METHODS) + 4),
  ]
  for batch, width in points:
    m = {name: by_key[name, batch, width] for name in models.METHODS}
    cells = [_milliseconds(m[name]) for name in models.METHODS]
    cells += [
      _ratio(m["splines"], m["relative"]),
      _ratio(m["naive"], m["relative"]),
      _ratio(m["relative"], m["plain"]),
      _ratio(m["lu"], m["relative"]),
    ]
    lines.append(f"| {batch} | {width} | " + " | ".join(cells) + " |")
  lines += [
    "",
    f"## Fitted exponent k of time ∝ D^k (least squares in log-log, D ≥ {config.fit_min_width})",
    "",
    "| B | " + " | ".join(models.METHODS) + " |",
    "|---:|" + "---:|" * len(models.METHODS),
  ]
  for batch in batches:
    exponents = [
      fitted_exponent(
        (m for m in measurements if m.method == name and m.batch == batch), config.fit_min_width
      )
      for name in models.METHODS
    ]
    lines.append(f"| {batch} | " + " | ".join(f"{k:.2f}" for k in exponents) + " |")
  lines += [
    "",
    f"## Memory (MiB; {MEMORY_SOURCE}, from `compiled.memory_analysis()`)",
    "",
    "| B | D | " + " | ".join(models.METHODS) + " |",
    "|---:|---:|" + "---:|" * len(models.METHODS),
  ]
  for batch, width in points:
    cells = [_mebibytes(by_key[name, batch, width]) for name in models.METHODS]
    lines.append(f"| {batch} | {width} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def write_reports(
  measurements: Sequence[timing.Measurement],
  config: timing.BenchmarkConfig,
  output_dir: pathlib.Path,
) -> str:
  """Writes scaling.csv, scaling.md and scaling.png into output_dir; returns the markdown."""
  output_dir.mkdir(parents=True, exist_ok=True)
  write_csv(measurements, output_dir / "scaling.csv")
  report = markdown_report(measurements, config)
  (output_dir / "scaling.md").write_text(report)
  plot.plot(measurements, output_dir / "scaling.png")
  return report
