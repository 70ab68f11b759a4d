"""`RationalQuadraticSpline`: learned elementwise monotone splines as a Flax Linen module.

Each coordinate i gets its own strictly increasing map s_i, a rational-quadratic spline on
[−B, B] and the identity outside, with all-zero params (the identity) at init. The maths
(knots, value, log-derivative, closed-form inverse) is in `flax_relgrad.core.splines`. The
params are ordinary leaves: inside :func:`flax_relgrad.value_and_relative_grad` they take
their ordinary gradient, next to the flow layers' relative one.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from flax_relgrad.core.dense import Dtype
from flax_relgrad.core.splines import Knots
from flax_relgrad.core.splines import SplineMethods
from flax_relgrad.core.splines import check_spline_settings
from flax_relgrad.core.splines import spline_knots


class RationalQuadraticSpline(SplineMethods, nn.Module):
  """A learned monotone rational-quadratic spline on every coordinate, identity outside [−B, B].

  Maps (..., D) → (..., D); `forward_and_log_det` also returns Σ_i log s_i'(x_i), shape (...);
  `inverse` is in closed form. D is taken from the input at init.

  Attributes:
    num_bins: K, the number of spline segments per coordinate (≥ 1).
    bound: B > 0; each coordinate is transformed on [−B, B] and left alone outside it.
    param_dtype: dtype of the parameters.
  """

  num_bins: int = 8
  bound: float = 4.0
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def knots(self, width: int) -> Knots:
    """Knot positions x, y and derivatives, each (D, K + 1), from the parameters."""
    check_spline_settings(self.num_bins, self.bound)
    shape = (width, self.num_bins)
    zeros = nn.initializers.zeros
    widths = self.param("widths", zeros, shape, self.param_dtype)
    heights = self.param("heights", zeros, shape, self.param_dtype)
    derivatives = self.param("derivatives", zeros, (width, self.num_bins - 1), self.param_dtype)
    return spline_knots(widths, heights, derivatives, self.bound)
