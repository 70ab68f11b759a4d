"""A dense stack's forward and inverse with its per-layer log-det terms; bases; input checks.

Row-vector convention. For inputs x of shape (..., D), a stack of L dense layers with an
optional spline s_k before layer k and an optional context modulation (t_k, s_k) after it:

    z_0 = x
    v_k = s_k(z_{k-1})                       (v_k = z_{k-1} where layer k has no spline)
    y_k = (v_k W_k + b_k)·exp(log_scale_k) + shift_k   (no modulation: y_k = v_k W_k + b_k)
    z_k = σ(y_k) for k < L,   z_L = y_L      (no activation after the last layer)

    log|det ∂z_L/∂x| = Σ_k [ Σ_i log s_k,i'(·) + log|det W_k| + Σ_i log_scale_k,i + Σ_i log σ'(y_k,i) ]

with the last layer's activation term 0. `LayerTerms` holds one bracket.
"""

from __future__ import annotations

from collections.abc import Sequence
import math
import operator
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp

from flax_relgrad.activations import Activation
from flax_relgrad.core.dense import DenseLayer
from flax_relgrad.core.dense import Dtype
from flax_relgrad.core.dense import factorisation_dtype

Modulation = tuple[jax.Array, jax.Array]
"""(shift, log_scale) applied to one layer's pre-activation: y ← y·exp(log_scale) + shift."""

GaussianParams = tuple[jax.Array, jax.Array] | None
"""(loc, log_scale) of a learned diagonal Gaussian base, or None for N(0, I)."""

SPLINE_PLACEMENTS = ("every_layer", "input")
"""Where a flow's splines go: before every dense layer, or only before the first (on the input
x alone). `spline_count` gives the number of splines for each."""

BASES = ("normal", "diagonal_gaussian")
"""Base densities of the flows: N(0, I), or N(loc, diag(exp(2·log_scale))) with learned
loc and log_scale (D,) (both start at 0). The base's params are ordinary leaves: they take
their ordinary gradient next to the flow layers' relative one."""


class Spline(Protocol):
  """What the core needs from a binding's elementwise spline layer."""

  def forward_and_log_det(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """s(x) (..., D) and Σ_i log s_i'(x_i), shape (...)."""
    ...

  def inverse(self, y: jax.Array) -> jax.Array:
    """s⁻¹(y), (..., D)."""
    ...


class LayerTerms(NamedTuple):
  """One dense layer's share of log|det ∂z/∂x| (see the module docstring), and its y.

  Attributes:
    spline_log_det: Σ_i log s_k,i' of the spline before the layer, per example (...); 0
      where the layer has no spline.
    kernel_log_abs_det: log|det W_k|, a scalar (its placeholder in the relative-gradient
      pass).
    modulation_log_det: Σ_i log_scale_k,i of a context modulation, per example (...); 0 for
      an unconditional flow.
    activation_log_det: Σ_i log σ'(y_k,i), per example (...); 0 for the last layer.
    preactivation: y_k, (..., D).
  """

  spline_log_det: jax.Array
  kernel_log_abs_det: jax.Array
  modulation_log_det: jax.Array
  activation_log_det: jax.Array
  preactivation: jax.Array

  def total(self) -> jax.Array:
    """The layer's whole log-det term per example, shape (...)."""
    return (
      self.spline_log_det
      + self.kernel_log_abs_det
      + self.modulation_log_det
      + self.activation_log_det
    )


class Stack(NamedTuple):
  """The parts of a dense stack a binding hands the core.

  Attributes:
    layers: the L dense layers.
    activation: the activation between them.
    splines: the splines before the first len(splines) layers (one per layer, or only one: on
      the input), or None.
  """

  layers: Sequence[DenseLayer]
  activation: Activation
  splines: Sequence[Spline] | None = None


def stack_forward(
  stack: Stack,
  x: jax.Array,
  modulations: Sequence[Modulation] | None = None,
  kernel_log_dets: bool = True,
) -> tuple[jax.Array, tuple[LayerTerms, ...]]:
  """z_L (..., D) and every layer's `LayerTerms` for inputs x (..., D).

  With `kernel_log_dets=False` the layers' log|det W_k| are not asked for (they are 0 in the
  terms): no `slogdet`, and in the relative-gradient pass the loss does not use them.
  """
  z = x
  zero = jnp.zeros(x.shape[:-1], x.dtype)
  terms = []
  last = len(stack.layers) - 1
  for index, layer in enumerate(stack.layers):
    spline_log_det = modulation_log_det = activation_log_det = zero
    spline = _spline_before(stack, index)
    if spline is not None:
      z, spline_log_det = spline.forward_and_log_det(z)
    y = layer(z)
    if modulations is not None:
      shift, log_scale = modulations[index]
      y = y * jnp.exp(log_scale) + shift
      modulation_log_det = log_scale.sum(-1)
    z = y
    if index != last:
      activation_log_det = stack.activation.log_derivative(y).sum(-1)
      z = stack.activation(y)
    kernel_log_det = layer.log_abs_det() if kernel_log_dets else jnp.zeros((), x.dtype)
    terms.append(
      LayerTerms(spline_log_det, kernel_log_det, modulation_log_det, activation_log_det, y)
    )
  return z, tuple(terms)


def stack_inverse(
  stack: Stack,
  z: jax.Array,
  modulations: Sequence[Modulation] | None = None,
  log_det: bool = True,
) -> tuple[jax.Array, jax.Array | None]:
  """x = g⁻¹(z) (..., D) of a dense stack (linear solves, Newton-inverted activations,
  closed-form spline inverses) and log|det ∂z/∂x| at x, shape (...): the sum of every
  `LayerTerms.total()` that `stack_forward(x)` gives (None with `log_det=False`)."""
  y = z
  terms = []
  for index in reversed(range(len(stack.layers))):
    if index != len(stack.layers) - 1:
      # The activation's Newton iteration needs float32 precision at least.
      y = stack.activation.inverse(y.astype(factorisation_dtype(y.dtype))).astype(y.dtype)
      if log_det:
        terms.append(stack.activation.log_derivative(y).sum(-1))
    if modulations is not None:
      shift, log_scale = modulations[index]
      y = (y - shift) * jnp.exp(-log_scale)
      if log_det:
        terms.append(log_scale.sum(-1))
    layer = stack.layers[index]
    y = layer.inverse(y)
    if log_det:
      terms.append(layer.log_abs_det())
    spline = _spline_before(stack, index)
    if spline is not None:
      y = spline.inverse(y)
      if log_det:
        terms.append(spline.forward_and_log_det(y)[1])
  if not log_det:
    return y, None
  return y, sum(terms, jnp.zeros(z.shape[:-1], z.dtype))


def _spline_before(stack: Stack, index: int) -> Spline | None:
  """The spline before layer `index`, or None."""
  if stack.splines is None:
    return None
  if len(stack.splines) not in (1, len(stack.layers)):
    raise ValueError(
      f"A dense stack of {len(stack.layers)} layers takes one spline per layer or one on the "
      f"input, got {len(stack.splines)} splines."
    )
  return stack.splines[index] if index < len(stack.splines) else None


def spline_count(num_layers: int, spline_bins: int, spline_placement: str) -> int:
  """How many splines a flow with these settings has: L, 1 (on the input) or 0 (no bins)."""
  if not spline_bins:
    return 0
  return 1 if spline_placement == "input" else num_layers


def standard_normal_log_prob(z: jax.Array) -> jax.Array:
  """Σ_i log N(z_i; 0, 1) over the last axis: shape z.shape[:-1]."""
  return -0.5 * (jnp.square(z).sum(-1) + z.shape[-1] * math.log(2 * math.pi))


def gaussian_log_prob(z: jax.Array, base: GaussianParams) -> jax.Array:
  """Σ_i log N(z_i; loc_i, exp(log_scale_i)²) over the last axis (standard normal for None)."""
  if base is None:
    return standard_normal_log_prob(z)
  loc, log_scale = base
  return standard_normal_log_prob((z - loc) * jnp.exp(-log_scale)) - log_scale.sum(-1)


def gaussian_sample(
  rng: jax.Array, shape: tuple[int, ...], dtype: Dtype, base: GaussianParams
) -> jax.Array:
  """Draws of shape `shape` (..., D): ε ~ N(0, I), then loc + exp(log_scale)·ε."""
  noise = jax.random.normal(rng, shape, dtype)
  if base is None:
    return noise
  loc, log_scale = base
  return loc + jnp.exp(log_scale) * noise


def check_flow_settings(
  num_layers: int,
  base: str,
  spline_bins: int,
  spline_placement: str = "every_layer",
  *,
  activation: Any,
) -> None:
  """Refuses settings no flow can have (a width below 1 is refused by `init_kernel`)."""
  if not isinstance(activation, Activation):
    raise ValueError(
      f"activation must be an Activation (σ with __call__, log_derivative and inverse), e.g. "
      f"fr.SmoothLeakyReLU(0.5); got {activation!r}."
    )
  if num_layers < 1:
    raise ValueError(f"A dense flow needs num_layers >= 1, got {num_layers}.")
  if base not in BASES:
    raise ValueError(f"base must be one of {BASES}, got {base!r}.")
  if spline_bins < 0:
    raise ValueError(f"spline_bins must be >= 0 (0: no splines), got {spline_bins}.")
  if spline_placement not in SPLINE_PLACEMENTS:
    raise ValueError(
      f"spline_placement must be one of {SPLINE_PLACEMENTS}, got {spline_placement!r}."
    )


def check_vectors(x: jax.Array, name: str = "inputs", width: int | None = None) -> None:
  """Refuses anything but a non-empty array of D-vectors (..., D), D = `width` if given."""
  if x.ndim < 1 or x.shape[-1] < 1:
    raise ValueError(f"The flow expects {name} of shape (..., D) with D >= 1, got {x.shape}.")
  if width is not None and x.shape[-1] != width:
    raise ValueError(
      f"The flow has D = {width} ({width}×{width} kernels) but got {name} of shape {x.shape}."
    )
  if x.size == 0:
    raise ValueError(f"The flow got empty {name} of shape {x.shape}.")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(
      f"The flow expects floating-point {name}, got dtype {x.dtype}: cast them first, e.g. "
      "x.astype(jnp.float32) (integer data such as pixels: dequantise them)."
    )


def sample_shape_tuple(sample_shape: Any) -> tuple[int, ...]:
  """`sample_shape` as a tuple of ints >= 1: 8 → (8,), (2, 5) → (2, 5), () → (); NumPy and JAX
  integer scalars count as ints, bools do not."""
  error = ValueError(f"sample_shape must be an int or a tuple of ints >= 1, got {sample_shape!r}.")
  shape = sample_shape if isinstance(sample_shape, (tuple, list)) else (sample_shape,)
  sizes = []
  for size in shape:
    if isinstance(size, bool) or getattr(size, "ndim", 0) != 0:
      raise error
    try:
      sizes.append(operator.index(size))
    except TypeError:
      raise error from None
  if any(size < 1 for size in sizes):
    raise error
  return tuple(sizes)
