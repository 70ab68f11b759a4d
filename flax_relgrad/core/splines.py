"""Learned elementwise monotone rational-quadratic splines (Durkan et al., 2019): the maths.

Each coordinate i has its own strictly increasing map s_i: ℝ → ℝ. Inside [−B, B] it is a
rational-quadratic spline through K + 1 knots (x_k, y_k), with x_0 = y_0 = −B, x_K = y_K = B
and positive derivatives d_k at the knots (d_0 = d_K = 1); outside it is the identity, so s_i
is continuous with a continuous derivative at ±B. On bin k, with w = x_{k+1} − x_k,
h = y_{k+1} − y_k, the mean slope m = h / w and ξ = (x − x_k) / w ∈ [0, 1]:

    s_i(x)  = y_k + h·(m ξ² + d_k ξ(1−ξ)) / (m + (d_k + d_{k+1} − 2m) ξ(1−ξ))
    s_i'(x) = m²·(d_{k+1} ξ² + 2m ξ(1−ξ) + d_k (1−ξ)²) / (m + (d_k + d_{k+1} − 2m) ξ(1−ξ))²

and the inverse solves a quadratic in ξ in closed form. The log-det of the layer is
Σ_i log s_i'(x_i): O(D·K) per example, next to the O(D²) of a dense layer.

Parameters (per coordinate, all zero at init, which makes every s_i the identity): bin widths
and heights are softmaxes of `widths` and `heights` (D, K) (each bin at least
`MIN_BIN_FRACTION` of 2B), the interior derivatives are 1e-3 + softplus of `derivatives`
(D, K − 1) shifted so that zero gives 1. They are ordinary parameters: inside
:func:`flax_relgrad.value_and_relative_grad` they take their ordinary gradient, next to the
flow layers' relative one.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

MIN_BIN_FRACTION = 1e-3
"""Smallest width or height of a bin, as a fraction of the interval's length 2B."""

MIN_DERIVATIVE = 1e-3
"""Smallest derivative at an interior knot."""

Knots = tuple[jax.Array, jax.Array, jax.Array]
"""(knot x positions, knot y positions, derivatives at the knots), each (D, K + 1)."""


class SplineMethods:
  """A spline layer's methods, derived from the binding's `knots(width)` and `bound`.

  Maps (..., D) → (..., D); `forward_and_log_det` also returns Σ_i log s_i'(x_i), shape (...).
  """

  bound: float

  def knots(self, width: int) -> Knots:
    """Knot positions x, y and derivatives, each (D, K + 1), from the parameters."""
    raise NotImplementedError

  def forward_and_log_det(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """s(x) (..., D) and Σ_i log s_i'(x_i) per example, shape (...)."""
    return spline_forward_and_log_det(self.knots(x.shape[-1]), self.bound, x)

  def __call__(self, x: jax.Array) -> jax.Array:
    """s(x), (..., D)."""
    return self.forward_and_log_det(x)[0]

  def inverse(self, y: jax.Array) -> jax.Array:
    """s⁻¹(y), (..., D), in closed form (the root in [0, 1] of each bin's quadratic)."""
    return spline_inverse(self.knots(y.shape[-1]), self.bound, y)


def check_spline_settings(num_bins: int, bound: float) -> None:
  if not 1 <= num_bins < 1 / MIN_BIN_FRACTION:
    raise ValueError(
      f"RationalQuadraticSpline needs 1 <= num_bins < {1 / MIN_BIN_FRACTION:.0f}, got {num_bins}."
    )
  if not bound > 0:
    raise ValueError(f"RationalQuadraticSpline needs bound > 0, got {bound}.")


def spline_knots(
  widths: jax.Array, heights: jax.Array, derivatives: jax.Array, bound: float
) -> Knots:
  """The knots from the raw parameters: `widths`, `heights` (D, K), `derivatives` (D, K − 1).

  Computed in at least float32: in bfloat16 the cumulative sums would misplace the knots by
  up to half of bfloat16's spacing (0.25 near 64).
  """
  dtype = jnp.promote_types(widths.dtype, jnp.float32)
  widths, heights, derivatives = (
    widths.astype(dtype),
    heights.astype(dtype),
    derivatives.astype(dtype),
  )
  shift = math.log(math.expm1(1.0 - MIN_DERIVATIVE))  # softplus(shift) + MIN_DERIVATIVE = 1
  interior = MIN_DERIVATIVE + jax.nn.softplus(derivatives + shift)
  ones = jnp.ones((widths.shape[0], 1), interior.dtype)
  return (
    _cumulative(widths, bound),
    _cumulative(heights, bound),
    jnp.concatenate([ones, interior, ones], axis=-1),
  )


def _cumulative(logits: jax.Array, bound: float) -> jax.Array:
  """Knots −B = k_0 < k_1 < ... < k_K = B from bin logits (D, K)."""
  num_bins = logits.shape[-1]
  fractions = MIN_BIN_FRACTION + (1.0 - MIN_BIN_FRACTION * num_bins) * jax.nn.softmax(
    logits, axis=-1
  )
  inner = -bound + 2.0 * bound * jnp.cumsum(fractions[:, :-1], axis=-1)
  edge = jnp.full((logits.shape[0], 1), bound, inner.dtype)
  return jnp.concatenate([-edge, inner, edge], axis=-1)


def spline_forward_and_log_det(
  knots: Knots, bound: float, x: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """s(x) (..., D) and Σ_i log s_i'(x_i), shape (...), of the splines with these knots.

  Computed in the knots' dtype (at least float32), returned in x's.
  """
  knots_x, knots_y, derivatives = knots
  inside = jnp.abs(x) < bound
  # Out-of-range values take the identity branch below.
  t = jnp.where(inside, x, 0.0).astype(knots_x.dtype)
  x_k, w, y_k, h, d_k, d_k1 = _bin_params(knots_x, knots_y, derivatives, _bin_one_hot(knots_x, t))
  slope = h / w
  xi = (t - x_k) / w
  xi_1m = xi * (1.0 - xi)
  denominator = slope + (d_k + d_k1 - 2.0 * slope) * xi_1m
  y = y_k + h * (slope * xi * xi + d_k * xi_1m) / denominator
  numerator = d_k1 * xi * xi + 2.0 * slope * xi_1m + d_k * jnp.square(1.0 - xi)
  log_derivative = 2.0 * jnp.log(slope) + jnp.log(numerator) - 2.0 * jnp.log(denominator)
  log_det = jnp.where(inside, log_derivative, 0.0).sum(-1)
  return jnp.where(inside, y.astype(x.dtype), x), log_det.astype(x.dtype)


def spline_inverse(knots: Knots, bound: float, y: jax.Array) -> jax.Array:
  """s⁻¹(y) (..., D) of the splines with these knots, in closed form."""
  knots_x, knots_y, derivatives = knots
  inside = jnp.abs(y) < bound
  t = jnp.where(inside, y, 0.0).astype(knots_x.dtype)
  x_k, w, y_k, h, d_k, d_k1 = _bin_params(knots_x, knots_y, derivatives, _bin_one_hot(knots_y, t))
  slope = h / w
  offset = t - y_k
  curvature = d_k + d_k1 - 2.0 * slope
  a = h * (slope - d_k) + offset * curvature
  b = h * d_k - offset * curvature
  c = -slope * offset
  discriminant = jnp.maximum(b * b - 4.0 * a * c, 0.0)
  xi = 2.0 * c / (-b - jnp.sqrt(discriminant))  # the stable root, also for a = 0
  return jnp.where(inside, (x_k + xi * w).astype(y.dtype), y)


def _bin_one_hot(knots: jax.Array, t: jax.Array) -> jax.Array:
  """One-hot (..., D, K) of the bin [knots_k, knots_{k+1}) holding each t (..., D).

  Selecting with a one-hot product (rather than an index and a gather) makes the gradient
  with respect to the knots a dense product instead of a scatter.
  """
  num_bins = knots.shape[-1] - 1
  index = (t[..., None] >= knots[..., 1:-1]).sum(-1)
  return jax.nn.one_hot(index, num_bins, dtype=t.dtype)


def _bin_params(knots_x, knots_y, derivatives, one_hot):
  """(x_k, w, y_k, h, d_k, d_{k+1}) of each element's bin, each shaped (..., D)."""

  def at(table, offset):
    return (one_hot * table[..., offset : offset + one_hot.shape[-1]]).sum(-1)

  x_k, y_k = at(knots_x, 0), at(knots_y, 0)
  return (
    x_k,
    at(knots_x, 1) - x_k,
    y_k,
    at(knots_y, 1) - y_k,
    at(derivatives, 0),
    at(derivatives, 1),
  )
