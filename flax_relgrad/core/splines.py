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
  y, log_derivative = _rational_quadratic(
    t, *_bin_params(knots_x, knots_y, derivatives, _bin_index(knots_x, t))
  )
  log_det = jnp.where(inside, log_derivative, 0.0).sum(-1)
  return jnp.where(inside, y.astype(x.dtype), x), log_det.astype(x.dtype)


@jax.custom_jvp
def _rational_quadratic(
  t: jax.Array,
  x_k: jax.Array,
  w: jax.Array,
  y_k: jax.Array,
  h: jax.Array,
  d_k: jax.Array,
  d_k1: jax.Array,
) -> tuple[jax.Array, jax.Array]:
  """s(t) and log s'(t) on each element's bin (all arrays (..., D)); see the module docstring.

  Its derivative rule (`_rational_quadratic_jvp`) is written out in closed form from the
  forward pass's terms: autodiff of these lines keeps about thirty intermediate arrays, and
  with it the training step with 8-bin splines took 2.16× the step without splines, against
  1.87–1.99× with the rule (separate runs of `python -m experiments.scaling.splines`,
  D = 784, B = 100, 8 layers, 2-core CPU).
  """
  return _rational_quadratic_terms(t, x_k, w, y_k, h, d_k, d_k1)[:2]


def _rational_quadratic_terms(t, x_k, w, y_k, h, d_k, d_k1):
  """(y, L = log s'(t), m, ξ, q, M, 1 / Den, R) in the notation of `_rational_quadratic_jvp`."""
  slope = h / w
  xi = (t - x_k) / w
  q = xi * (1.0 - xi)
  inverse_denominator = 1.0 / (slope + (d_k + d_k1 - 2.0 * slope) * q)
  ratio = (slope * xi * xi + d_k * q) * inverse_denominator
  numerator = d_k1 * xi * xi + 2.0 * slope * q + d_k * jnp.square(1.0 - xi)
  y = y_k + h * ratio
  log_derivative = jnp.log(jnp.square(slope * inverse_denominator) * numerator)
  return y, log_derivative, slope, xi, q, numerator, inverse_denominator, ratio


@_rational_quadratic.defjvp
def _rational_quadratic_jvp(primals, tangents):
  """With m = h / w, ξ = (t − x_k) / w, q = ξ(1 − ξ), Den = m + (d_k + d_{k+1} − 2m) q,
  R = (m ξ² + d_k q) / Den, M = d_{k+1} ξ² + 2m q + d_k (1 − ξ)², y = y_k + h R and
  L = log s' = log(m² M / Den²):

      ∂R/∂ξ = m M / Den²            ∂R/∂m = (ξ² − R (1 − 2q)) / Den
      ∂R/∂d_k = q (1 − R) / Den     ∂R/∂d_{k+1} = −q R / Den
      ∂L/∂ξ = M_ξ / M − 2 (d_k + d_{k+1} − 2m)(1 − 2ξ) / Den,
              M_ξ = 2 d_{k+1} ξ + 2m (1 − 2ξ) − 2 d_k (1 − ξ)
      ∂L/∂m = 2/m + 2q/M − 2 (1 − 2q) / Den
      ∂L/∂d_k = (1 − ξ)² / M − 2q / Den     ∂L/∂d_{k+1} = ξ² / M − 2q / Den

  and dξ = (dt − dx_k − ξ dw) / w, dm = (dh − m dw) / w.
  """
  t, x_k, w, y_k, h, d_k, d_k1 = primals
  dt, dx_k, dw, dy_k, dh, dd_k, dd_k1 = tangents
  y, log_derivative, slope, xi, q, numerator, inverse_den, ratio = _rational_quadratic_terms(
    *primals
  )
  inverse_w = 1.0 / w
  inverse_numerator = 1.0 / numerator
  d_xi = (dt - dx_k - xi * dw) * inverse_w
  d_slope = (dh - slope * dw) * inverse_w
  one_minus_2q = 1.0 - 2.0 * q
  one_minus_2xi = 1.0 - 2.0 * xi
  two_q_over_den = 2.0 * q * inverse_den
  dy = (
    dy_k
    + ratio * dh
    + h
    * inverse_den
    * (
      slope * numerator * inverse_den * d_xi
      + (xi * xi - ratio * one_minus_2q) * d_slope
      + q * (1.0 - ratio) * dd_k
      - q * ratio * dd_k1
    )
  )
  numerator_xi = 2.0 * (d_k1 * xi + slope * one_minus_2xi - d_k * (1.0 - xi))
  curvature = d_k + d_k1 - 2.0 * slope
  d_log_derivative = (
    (numerator_xi * inverse_numerator - 2.0 * curvature * one_minus_2xi * inverse_den) * d_xi
    + (2.0 / slope + 2.0 * q * inverse_numerator - 2.0 * one_minus_2q * inverse_den) * d_slope
    + (jnp.square(1.0 - xi) * inverse_numerator - two_q_over_den) * dd_k
    + (xi * xi * inverse_numerator - two_q_over_den) * dd_k1
  )
  return (y, log_derivative), (dy, d_log_derivative)


def spline_inverse(knots: Knots, bound: float, y: jax.Array) -> jax.Array:
  """s⁻¹(y) (..., D) of the splines with these knots, in closed form."""
  knots_x, knots_y, derivatives = knots
  inside = jnp.abs(y) < bound
  t = jnp.where(inside, y, 0.0).astype(knots_x.dtype)
  x_k, w, y_k, h, d_k, d_k1 = _bin_params(knots_x, knots_y, derivatives, _bin_index(knots_y, t))
  slope = h / w
  offset = t - y_k
  curvature = d_k + d_k1 - 2.0 * slope
  a = h * (slope - d_k) + offset * curvature
  b = h * d_k - offset * curvature
  c = -slope * offset
  discriminant = jnp.maximum(b * b - 4.0 * a * c, 0.0)
  xi = 2.0 * c / (-b - jnp.sqrt(discriminant))  # the stable root, also for a = 0
  return jnp.where(inside, (x_k + xi * w).astype(y.dtype), y)


def _bin_index(knots: jax.Array, t: jax.Array) -> jax.Array:
  """The index k (..., D) of the bin [knots_k, knots_{k+1}) holding each t (..., D), for
  knots (D, K + 1); t below the first interior knot is in bin 0, above the last in bin K − 1."""
  return (t[..., None] >= knots[..., 1:-1]).sum(-1)


def _bin_params(
  knots_x: jax.Array, knots_y: jax.Array, derivatives: jax.Array, index: jax.Array
) -> tuple[jax.Array, ...]:
  """(x_k, w, y_k, h, d_k, d_{k+1}) of each element's bin k = index (..., D), each (..., D).

  Each is a gather of B·D values from a flattened (D·(K + 1)) table, whose gradient is a
  scatter-add of B·D values: O(B·D) work, where selecting with a one-hot (..., D, K) product
  would cost O(B·D·K) per table, forward and backward (about three times as long at K = 8).
  """
  width, num_knots = knots_x.shape
  rows = index + num_knots * jnp.arange(width)

  def at(table: jax.Array, offset: int) -> jax.Array:
    return jnp.take(table.reshape(-1), rows + offset, mode="clip")  # Always in bounds.

  x_k, y_k = at(knots_x, 0), at(knots_y, 0)
  return (
    x_k,
    at(knots_x, 1) - x_k,
    y_k,
    at(knots_y, 1) - y_k,
    at(derivatives, 0),
    at(derivatives, 1),
  )
