"""The distribution methods of a flow, derived once from a few hooks (as distrax derives a
bijector's methods from `forward_and_log_det`).

Data → latent is the forward direction: z = g(x), and log p(x) = log p_base(z) + log|det ∂z/∂x|.
A binding (Linen or NNX module) inherits `Flow` or `ConditionalFlow` and implements:

- attributes `layers` (its dense layers), `activation` and `splines` (before the first
  len(splines) layers: every one, or only the first; or None);
- `_width()`: D, or None while a Linen module is being initialized;
- `_latent_dtype()`: the dtype base draws are made in (the kernels');
- `_base_params(width)`: (loc, log_scale) of a learned diagonal Gaussian base, or None;
- `_modulations(context, leading_shape, width)` (conditional flows): every layer's
  (shift, log_scale) from the context.

Every method maps the last axis and keeps any leading batch shape; a conditional flow takes
its context c (..., C), with the leading shape of x, as the further argument.
"""

from __future__ import annotations

from collections.abc import Iterable
from collections.abc import Sequence
import functools
import operator
from typing import Any

import jax
import jax.numpy as jnp

from flax_relgrad.activations import Activation
from flax_relgrad.core.dense import DenseLayer
from flax_relgrad.core.dense import Dtype
from flax_relgrad.core.stack import GaussianParams
from flax_relgrad.core.stack import LayerTerms
from flax_relgrad.core.stack import Modulation
from flax_relgrad.core.stack import Spline
from flax_relgrad.core.stack import Stack
from flax_relgrad.core.stack import check_vectors
from flax_relgrad.core.stack import gaussian_log_prob
from flax_relgrad.core.stack import gaussian_sample
from flax_relgrad.core.stack import sample_shape_tuple
from flax_relgrad.core.stack import stack_forward
from flax_relgrad.core.stack import stack_inverse

SampleShape = int | Sequence[int]


class FlowMethods:
  """The methods shared by unconditional and conditional flows (`*context`: () or (c,))."""

  layers: Sequence[DenseLayer]
  activation: Activation
  splines: Sequence[Spline] | None

  def _stack(self) -> Stack:
    return Stack(self.layers, self.activation, self.splines)

  def _width(self) -> int | None:
    raise NotImplementedError

  def _latent_dtype(self) -> Dtype:
    raise NotImplementedError

  def _base_params(self, width: int) -> GaussianParams:
    raise NotImplementedError

  def _modulations(
    self, context: tuple[jax.Array, ...], leading_shape: tuple[int, ...], width: int
  ) -> Sequence[Modulation] | None:
    if context:
      raise TypeError(
        f"{type(self).__name__} is unconditional and takes no context; got {len(context)} "
        "extra argument(s). Use ConditionalFlowMLP for p(x | c)."
      )
    return None

  def _forward(self, x: jax.Array, context: tuple[jax.Array, ...], kernel_log_dets: bool):
    x = jnp.asarray(x)  # NumPy float64 becomes float32 here, as JAX does, when x64 is off
    check_vectors(x, width=self._width())
    self._base_params(x.shape[-1])  # a Linen module creates a learned base's params at init
    modulations = self._modulations(context, x.shape[:-1], x.shape[-1])
    return stack_forward(self._stack(), x, modulations, kernel_log_dets)

  def __call__(self, x: jax.Array, *context: jax.Array) -> jax.Array:
    """Data x (..., D) → latent z (..., D)."""
    return self._forward(x, context, kernel_log_dets=False)[0]

  def forward_and_layer_terms(
    self, x: jax.Array, *context: jax.Array
  ) -> tuple[jax.Array, tuple[LayerTerms, ...]]:
    """Latent z (..., D) and each dense layer's `LayerTerms` (its spline's, kernel's,
    modulation's and activation's log-det terms and its pre-activation); summed with
    `LayerTerms.total`, they give `forward_and_log_det`'s log-det."""
    return self._forward(x, context, kernel_log_dets=True)

  def forward_and_activation_log_det(
    self, x: jax.Array, *context: jax.Array
  ) -> tuple[jax.Array, jax.Array]:
    """Latent z (..., D) and the example-dependent part of log|det ∂z/∂x|, shape (...):
    every term but the kernels' Σ_k log|det W_k| (which is `kernel_log_abs_det()`)."""
    z, terms = self._forward(x, context, kernel_log_dets=False)
    return z, _sum(term.total() for term in terms)

  def kernel_log_abs_det(self) -> jax.Array:
    """Σ_k log|det W_k| (a scalar): O(L·D³) in a plain apply, free in the relative pass."""
    return _sum(layer.log_abs_det() for layer in self._stack().layers)

  def forward_and_log_det(self, x: jax.Array, *context: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Latent z (..., D) and the exact log|det ∂z/∂x| per example, shape (...)."""
    z, terms = self.forward_and_layer_terms(x, *context)
    return z, _sum(term.total() for term in terms)

  def log_prob(self, x: jax.Array, *context: jax.Array) -> jax.Array:
    """Exact log p(x) = log p_base(z) + log|det ∂z/∂x| per example, shape (...)."""
    z, log_det = self.forward_and_log_det(x, *context)
    return self.base_log_prob(z) + log_det

  def base_log_prob(self, z: jax.Array) -> jax.Array:
    """log p_base(z) per latent (..., D), shape (...)."""
    check_vectors(z, "latents", self._width())
    return gaussian_log_prob(z, self._base_params(z.shape[-1]))

  def inverse(self, z: jax.Array, *context: jax.Array) -> jax.Array:
    """Latent z (..., D) → data x (..., D): linear solves, Newton-inverted activations,
    closed-form spline inverses."""
    return self._inverse(z, context, log_det=False)[0]

  def inverse_and_log_det(self, z: jax.Array, *context: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Data x = g⁻¹(z) (..., D) and log|det ∂x/∂z| per latent, shape (...)."""
    x, log_det = self._inverse(z, context, log_det=True)
    return x, -log_det

  def _inverse(
    self, z: jax.Array, context: tuple[jax.Array, ...], log_det: bool
  ) -> tuple[jax.Array, Any]:
    z = jnp.asarray(z)
    check_vectors(z, "latents", self._width())
    modulations = self._modulations(context, z.shape[:-1], z.shape[-1])
    return stack_inverse(self._stack(), z, modulations, log_det)

  def _base_sample(
    self, rng: jax.Array, leading_shape: tuple[int, ...]
  ) -> tuple[jax.Array, GaussianParams]:
    width = self._width()
    if width is None:
      raise ValueError(
        f"{type(self).__name__}: initialize the flow (init with data) before sampling."
      )
    base = self._base_params(width)
    return gaussian_sample(rng, leading_shape + (width,), self._latent_dtype(), base), base

  def _draw(
    self,
    rng: jax.Array,
    context: tuple[jax.Array, ...],
    sample_shape: SampleShape,
    with_log_prob: bool,
  ) -> Any:
    """Draws x = g⁻¹(z), z ~ p_base, and optionally their exact log p(x), in one pass."""
    shape = sample_shape_tuple(sample_shape)
    context = tuple(jnp.broadcast_to(c, shape + jnp.shape(c)) for c in map(jnp.asarray, context))
    z, base = self._base_sample(rng, context[0].shape[:-1] if context else shape)
    if not with_log_prob:
      return self.inverse(z, *context)
    x, log_det = self._inverse(z, context, log_det=True)
    return x, gaussian_log_prob(z, base) + log_det


class Flow(FlowMethods):
  """The methods of an unconditional flow p(x): `log_prob(x)`, `sample(rng, sample_shape)`,
  `sample_and_log_prob(rng, sample_shape)`, `forward_and_log_det(x)`,
  `inverse_and_log_det(z)`, ... Sampling is differentiable (implicit differentiation of the
  activation's Newton inverse, autodiff through the solves)."""

  def sample(self, rng: jax.Array, sample_shape: SampleShape = ()) -> jax.Array:
    """Draws x = g⁻¹(z), z ~ p_base: shape sample_shape + (D,) (`sample(rng, 8)`: (8, D))."""
    return self._draw(rng, (), sample_shape, with_log_prob=False)

  def sample_and_log_prob(
    self, rng: jax.Array, sample_shape: SampleShape = ()
  ) -> tuple[jax.Array, jax.Array]:
    """Draws x (sample_shape + (D,)) and their exact log p(x) (sample_shape), one pass."""
    return self._draw(rng, (), sample_shape, with_log_prob=True)


class ConditionalFlow(FlowMethods):
  """The methods of a conditional flow p(x | c): every method takes the context c (..., C)
  after its data argument; `sample(rng, c, sample_shape)` and
  `sample_and_log_prob(rng, c, sample_shape)` draw sample_shape + c.shape[:-1] + (D,)."""

  def sample(self, rng: jax.Array, c: jax.Array, sample_shape: SampleShape = ()) -> jax.Array:
    """Draws x ~ p(x | c): shape sample_shape + c.shape[:-1] + (D,) (one per context row for
    the default sample_shape=())."""
    return self._draw(rng, (c,), sample_shape, with_log_prob=False)

  def sample_and_log_prob(
    self, rng: jax.Array, c: jax.Array, sample_shape: SampleShape = ()
  ) -> tuple[jax.Array, jax.Array]:
    """Draws x (sample_shape + c.shape[:-1] + (D,)) and their exact log p(x | c)."""
    return self._draw(rng, (c,), sample_shape, with_log_prob=True)


def _sum(arrays: Iterable[jax.Array]) -> jax.Array:
  """The sum of at least one array (a flow has at least one layer)."""
  return functools.reduce(operator.add, arrays)


def check_context(
  context: tuple[jax.Array, ...], leading_shape: tuple[int, ...], owner: str
) -> jax.Array:
  """The one context array c, checked to have shape leading_shape + (C,)."""
  if len(context) != 1:
    raise TypeError(f"{owner} takes one context array c (..., C) after x, got {len(context)}.")
  c = jnp.asarray(context[0])
  if c.ndim < 1 or tuple(c.shape[:-1]) != tuple(leading_shape):
    raise ValueError(
      f"{owner} expects a context of shape {tuple(leading_shape) + ('C',)} "
      f"(the leading shape of x, then the context features), got {c.shape}."
    )
  return c


def check_head_features(features: jax.Array, expected: int | None) -> None:
  """Refuses features h (..., H) of another width than a modulation head's H (the width it
  was initialized with, Linen; `context_features` or the conditioner's output, NNX)."""
  if expected is not None and features.shape[-1] != expected:
    raise ValueError(
      f"The conditional flow's modulation head takes {expected} features per row, but the "
      f"context (or the conditioner's output, with a conditioner) has {features.shape[-1]} "
      f"(shape {features.shape}). Pass contexts of the width the flow was initialized with, "
      "or build it for yours (NNX: context_features)."
    )


def split_modulations(
  values: jax.Array, num_layers: int, scale: bool, width: int
) -> list[Modulation]:
  """Every layer's (shift, log_scale), each (..., D), from a head's output (..., L·n·D), n = 2
  with scales (shift then log-scale per layer) and 1 without (log-scales 0)."""
  outputs = 2 if scale else 1
  values = values.reshape(values.shape[:-1] + (num_layers, outputs, width))
  shifts = values[..., 0, :]
  log_scales = values[..., 1, :] if scale else jnp.zeros_like(shifts)
  return [(shifts[..., k, :], log_scales[..., k, :]) for k in range(num_layers)]
