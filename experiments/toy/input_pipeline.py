"""The input pipeline of `experiments.toy`: the standard 2-D densities, generated on the fly,
as a `DataSource` (`config.data_source = "toy"`).

`sample_2d(name, n, rng)` draws n points (n, 2) of one of `DENSITIES`; the three splits are
seeded draws of `config.num_train`, `num_validation` and `num_test` points. The data are
modelled as they are (no preprocessing), so log-likelihoods are in nats of R². The picture
has three panels: data samples, the learned density exp(log p) on a grid (exact
`FlowMLP.log_prob`), and model samples.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
from matplotlib import figure as mpl_figure  # pylint: disable=g-import-not-at-top
from matplotlib.backends import backend_agg  # pylint: disable=g-import-not-at-top
import ml_collections
import numpy as np

import flax_relgrad as fr
from experiments.training import data


def _sine(n, rng):
  x = rng.uniform(-2.0, 2.0, n)
  return np.stack([x, np.sin(3.0 * x) + 0.25 * rng.standard_normal(n)], axis=1)


def _moons(n, rng):
  upper = rng.random(n) < 0.5
  angle = rng.uniform(0.0, math.pi, n)
  x = np.where(upper, np.cos(angle), 1.0 - np.cos(angle))
  y = np.where(upper, np.sin(angle), 0.5 - np.sin(angle))
  return np.stack([x, y], axis=1) + 0.05 * rng.standard_normal((n, 2))


def _two_spirals(n, rng):
  turn = np.sqrt(rng.random(n)) * 3.0 * math.pi  # 540° of arc.
  sign = np.where(rng.random(n) < 0.5, 1.0, -1.0)[:, None]
  arm = np.stack([-np.cos(turn) * turn, np.sin(turn) * turn], axis=1) + 0.5 * rng.random((n, 2))
  return sign * arm / 3.0 + 0.1 * rng.standard_normal((n, 2))


def _checkerboard(n, rng):
  x1 = rng.uniform(-2.0, 2.0, n)
  x2 = rng.random(n) - 2.0 * rng.integers(0, 2, n) + np.floor(x1) % 2
  return 2.0 * np.stack([x1, x2], axis=1)


def _rings(n, rng):
  radius = 3.0 * rng.choice([1.0, 0.75, 0.5, 0.25], n)
  angle = rng.uniform(0.0, 2.0 * math.pi, n)
  points = radius[:, None] * np.stack([np.cos(angle), np.sin(angle)], axis=1)
  return points + 0.08 * rng.standard_normal((n, 2))


def _eight_gaussians(n, rng):
  angle = rng.integers(0, 8, n) * (math.pi / 4.0)
  centers = 4.0 * np.stack([np.cos(angle), np.sin(angle)], axis=1)
  return (centers + 0.5 * rng.standard_normal((n, 2))) / math.sqrt(2.0)


def _trimodal(n, rng):
  which = rng.integers(0, 3, n)
  centers = np.array([[0.0, 0.0], [5.0, 5.0], [5.0, -5.0]])[which]
  scales = np.array([1.0, 0.5, 0.5])[which, None]
  return centers + scales * rng.standard_normal((n, 2))


DENSITIES = {
  "sine": (_sine, (-3.0, 3.0)),
  "moons": (_moons, (-1.5, 2.5)),
  "2spirals": (_two_spirals, (-4.0, 4.0)),
  "checkerboard": (_checkerboard, (-4.5, 4.5)),
  "rings": (_rings, (-4.0, 4.0)),
  "8gaussians": (_eight_gaussians, (-4.0, 4.0)),
  "trimodal": (_trimodal, (-7.0, 7.0)),
}
"""name → (sampler (n, rng) → (n, 2), the square plotting range [lo, hi]²)."""


def sample_2d(name: str, num_points: int, rng: np.random.Generator) -> np.ndarray:
  """num_points draws (num_points, 2) float64 of the 2-D density `name`."""
  if name not in DENSITIES:
    raise ValueError(
      f"config.dataset={name!r} is not one of the 2-D densities {sorted(DENSITIES)}."
    )
  return DENSITIES[name][0](num_points, rng)


def draw_panels(
  data_points: np.ndarray,
  density: np.ndarray,
  model_points: np.ndarray,
  plot_range: tuple[float, float],
) -> np.ndarray:
  """Three panels side by side → RGBA pixels (H, W, 4) in [0, 1].

  `density` (G, G) holds p on a G×G grid over plot_range², rows along the second coordinate.
  """
  figure = mpl_figure.Figure(figsize=(12, 4), dpi=80)
  canvas = backend_agg.FigureCanvasAgg(figure)
  bins = np.linspace(*plot_range, 100)
  for index, (title, points) in enumerate(
    [("data", data_points), ("model density", None), ("model samples", model_points)]
  ):
    axes = figure.add_subplot(1, 3, index + 1)
    if points is None:
      axes.imshow(density, origin="lower", extent=(*plot_range, *plot_range), cmap="viridis")
    else:
      axes.hist2d(points[:, 0], points[:, 1], bins=[bins, bins], cmap="viridis")
    axes.set_title(title)
    axes.set_xlim(*plot_range)
    axes.set_ylim(*plot_range)
    axes.set_aspect("equal")
    axes.set_xticks([])
    axes.set_yticks([])
  figure.tight_layout()
  canvas.draw()
  return np.asarray(canvas.buffer_rgba(), np.float32) / 255.0


class ToySource(data.ArraySource):
  """`config.dataset` ∈ DENSITIES; splits of num_train / num_validation / num_test points."""

  picture_name = "density"
  grid_size = 200  # Points per side of the density heat map.

  def __init__(self, config: ml_collections.ConfigDict):
    sizes = (config.num_train, config.num_validation, config.num_test)
    if min(sizes) < 2:
      raise ValueError(f"config.num_train, num_validation and num_test must be >= 2, got {sizes}.")
    self.name = config.dataset
    train, validation, test = (
      sample_2d(config.dataset, size, np.random.default_rng([config.seed, stream]))
      for stream, size in enumerate(sizes)
    )
    self.validation_points = validation
    self.splits = data.arrays_to_splits(train, validation, test)

  def make_picture(self, model: fr.FlowMLP) -> data.Picture:
    plot_range = DENSITIES[self.name][1]
    axis = jnp.linspace(*plot_range, self.grid_size)
    grid = jnp.stack(jnp.meshgrid(axis, axis), axis=-1).reshape(-1, 2)  # Rows: second coordinate.
    num_points = self.validation_points.shape[0]

    @jax.jit
    def density_and_samples(params, rng):
      variables = {"params": params}
      log_prob = model.apply(variables, grid, method=fr.FlowMLP.log_prob)
      samples = model.apply(variables, rng, num_points, method=fr.FlowMLP.sample)
      return jnp.exp(log_prob).reshape(self.grid_size, self.grid_size), samples

    def picture(params, rng):
      density, samples = (np.asarray(array) for array in density_and_samples(params, rng))
      samples = samples[np.all(np.isfinite(samples), axis=1)]
      return draw_panels(self.validation_points, density, samples, plot_range)

    return picture
