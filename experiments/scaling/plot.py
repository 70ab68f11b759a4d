"""The scaling benchmark's plot: median seconds per step against D, log-log (scaling.png)."""

from __future__ import annotations

from collections.abc import Sequence
import pathlib

from experiments.scaling import models
from experiments.scaling import timing


def plot(measurements: Sequence[timing.Measurement], path: pathlib.Path) -> None:
  """Log-log plot of median seconds per step against D, one panel per batch size."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  batches = sorted({m.batch for m in measurements})
  figure, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 4), squeeze=False)
  for axis, batch in zip(axes[0], batches, strict=True):
    for name in models.METHODS:
      kept = sorted(
        (m.width, m.median_s)
        for m in measurements
        if m.method == name and m.batch == batch and not m.skipped
      )
      if kept:
        widths, times = zip(*kept, strict=True)
        axis.loglog(widths, times, marker="o", label=name)
    axis.set(title=f"B = {batch}", xlabel="width D", ylabel="seconds per training step")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend()
  figure.suptitle(timing.device_label(), fontsize=9)
  figure.tight_layout()
  figure.savefig(path, dpi=120)
  plt.close(figure)
