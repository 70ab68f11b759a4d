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
from scipy import special

import flax_relgrad as fr
from experiments.training import data
from experiments.training import evaluation


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


def _gaussian_mixture_log_prob(points, centers, scales, log_weights):
  """log Σ_j w_j N(x; c_j, s_j² I) in R², for points (n, 2), centers (m, 2), scales (m,)."""
  squared = np.sum(np.square(points[:, None, :] - centers[None]), axis=-1)
  terms = log_weights - squared / (2.0 * scales**2) - np.log(2.0 * math.pi * scales**2)
  return special.logsumexp(terms, axis=1)


def _in_chunks(log_prob, points, chunk_size):
  """log_prob (m, 2) → (m,) applied to points (n, 2) chunk_size at a time (bounded memory)."""
  chunks = np.array_split(points, max(1, -(-len(points) // chunk_size)))
  return np.concatenate([log_prob(chunk) for chunk in chunks])


def _sine_log_prob(points):
  x, y = points[:, 0], points[:, 1]
  residual = (y - np.sin(3.0 * x)) / 0.25
  log_p = -math.log(4.0) - 0.5 * residual**2 - math.log(0.25 * math.sqrt(2.0 * math.pi))
  return np.where(np.abs(x) <= 2.0, log_p, -np.inf)


def _moons_log_prob(points, num_nodes=1000):
  angle = (np.arange(num_nodes) + 0.5) * (math.pi / num_nodes)  # Midpoints: angle ~ U[0, π].
  upper = np.stack([np.cos(angle), np.sin(angle)], axis=1)
  centers = np.concatenate([upper, np.stack([1.0 - upper[:, 0], 0.5 - upper[:, 1]], axis=1)])
  scales = np.full(2 * num_nodes, 0.05)
  log_weights = np.full(2 * num_nodes, -math.log(2 * num_nodes))
  component = lambda chunk: _gaussian_mixture_log_prob(chunk, centers, scales, log_weights)
  return _in_chunks(component, points, 500)


def _two_spirals_log_prob(points, num_nodes=2000):
  """x = ±(c(t) + U)/3 + 0.1ε with U ~ U[0, 1]² and t = 3π√u, whose density is 2t/(3π)²:
  per axis a box of width 1/6 convolved with N(0, 0.1²), integrated over t by the midpoint
  rule (nodes at most 0.015 apart along the arm)."""
  length = 3.0 * math.pi
  turn = (np.arange(num_nodes) + 0.5) * (length / num_nodes)
  log_weights = np.log(2.0 * turn / (length * num_nodes))  # 2t/(3π)² dt; they sum to 1.
  centers = np.stack([-np.cos(turn) * turn, np.sin(turn) * turn], axis=1) / 3.0

  def log_box(offset):  # log density of U[0, 1/6] + N(0, 0.1²) at offset.
    a, b = offset / 0.1, (offset - 1.0 / 6.0) / 0.1
    mass = np.where(b > 0, special.ndtr(-b) - special.ndtr(-a), special.ndtr(a) - special.ndtr(b))
    return math.log(6.0) + np.log(np.maximum(mass, 1e-300))

  def component(chunk):
    arms = []
    for sign in (1.0, -1.0):  # The second arm is the first one mirrored through the origin.
      offset = sign * chunk[:, None, :] - centers[None]
      arms.append(special.logsumexp(log_box(offset).sum(-1) + log_weights, axis=1))
    return np.logaddexp(*arms) - math.log(2.0)

  return _in_chunks(component, points, 200)


def _checkerboard_log_prob(points):
  x1, x2 = points[:, 0] / 2.0, points[:, 1] / 2.0  # The sampler's unit squares.
  shifted = x2 - np.floor(x1) % 2
  inside = (np.abs(x1) <= 2.0) & (
    ((shifted >= 0.0) & (shifted < 1.0)) | ((shifted >= -2.0) & (shifted < -1.0))
  )
  return np.where(inside, -math.log(32.0), -np.inf)


def _rings_log_prob(points):
  """Uniform angle on 4 circles + N(0, 0.08² I): the angle integral is a Bessel function I₀."""
  radius = np.linalg.norm(points, axis=1)[:, None]
  radii, scale = 3.0 * np.array([1.0, 0.75, 0.5, 0.25]), 0.08
  terms = (
    -np.square(radius - radii) / (2.0 * scale**2)
    + np.log(special.i0e(radius * radii / scale**2))
    - math.log(2.0 * math.pi * scale**2)
  )
  return special.logsumexp(terms, axis=1) - math.log(4.0)


def _eight_gaussians_log_prob(points):
  angle = np.arange(8) * (math.pi / 4.0)
  centers = 4.0 * np.stack([np.cos(angle), np.sin(angle)], axis=1) / math.sqrt(2.0)
  return _gaussian_mixture_log_prob(
    points, centers, np.full(8, 0.5 / math.sqrt(2.0)), np.full(8, -math.log(8.0))
  )


def _trimodal_log_prob(points):
  centers = np.array([[0.0, 0.0], [5.0, 5.0], [5.0, -5.0]])
  return _gaussian_mixture_log_prob(
    points, centers, np.array([1.0, 0.5, 0.5]), np.full(3, -math.log(3.0))
  )


LOG_PROBS = {
  "sine": _sine_log_prob,
  "moons": _moons_log_prob,
  "2spirals": _two_spirals_log_prob,
  "checkerboard": _checkerboard_log_prob,
  "rings": _rings_log_prob,
  "8gaussians": _eight_gaussians_log_prob,
  "trimodal": _trimodal_log_prob,
}
"""name → the exact log-density (points (n, 2) → (n,)), in closed form or (moons, 2spirals)
by quadrature along the curve the sampler draws from (nodes far closer than the noise)."""


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


def _check_name(name: str) -> None:
  if name not in DENSITIES:
    raise ValueError(
      f"config.dataset={name!r} is not one of the 2-D densities {sorted(DENSITIES)}."
    )


def sample_2d(name: str, num_points: int, rng: np.random.Generator) -> np.ndarray:
  """num_points draws (num_points, 2) float64 of the 2-D density `name`."""
  _check_name(name)
  return DENSITIES[name][0](num_points, rng)


def log_prob_2d(name: str, points: np.ndarray) -> np.ndarray:
  """The exact log-density (n,) of the 2-D density `name` at points (n, 2), in nats."""
  _check_name(name)
  return LOG_PROBS[name](np.asarray(points, np.float64))


def minus_entropy(name: str, num_points: int = 20_000, seed: int = 1) -> tuple[float, float]:
  """Monte Carlo estimate of −H = E[log p(x)] and its 2 standard errors: the best expected
  log-likelihood any model can reach on the density `name`."""
  log_p = log_prob_2d(name, sample_2d(name, num_points, np.random.default_rng(seed)))
  return evaluation.mean_and_two_standard_errors(log_p)


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


if __name__ == "__main__":  # python -m experiments.toy.input_pipeline [num_points]
  import sys

  num_points = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
  for density in DENSITIES:
    mean, two_se = minus_entropy(density, num_points)
    print(f"{density}: -entropy {mean:.3f} ± {two_se:.3f} nats ({num_points} samples)")
