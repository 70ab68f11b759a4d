"""Strictly increasing elementwise activations with a log-derivative and an inverse.

A flow layer needs three things from its activation σ: the value σ(t), the log-derivative
log σ'(t) (the per-coordinate log-Jacobian), and the inverse σ⁻¹(y) for sampling. Any object
that satisfies the :class:`Activation` protocol, is hashable (a frozen dataclass) and is
strictly increasing can be plugged into :class:`flax_relgrad.FlowMLP`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Protocol, runtime_checkable

import jax
import jax.numpy as jnp


@runtime_checkable
class Activation(Protocol):
  """A strictly increasing elementwise map σ: ℝ → ℝ (all methods act elementwise)."""

  def __call__(self, t: jax.Array) -> jax.Array:
    """σ(t)."""

  def log_derivative(self, t: jax.Array) -> jax.Array:
    """log σ'(t)."""

  def inverse(self, y: jax.Array) -> jax.Array:
    """σ⁻¹(y)."""


@dataclasses.dataclass(frozen=True)
class SmoothLeakyReLU:
  """σ(t) = αt + (1−α)·softplus(t), the activation of Gresele et al. (2020).

  σ'(t) = α + (1−α)·sigmoid(t) lies in (α, 1], so σ is strictly increasing and convex
  and its inverse exists on the whole real line.

  Attributes:
    alpha: slope for t → −∞, in (0, 1]. α = 1 is the identity.
  """

  alpha: float = 0.01

  def __post_init__(self):
    if not 0.0 < self.alpha <= 1.0:
      raise ValueError(f"SmoothLeakyReLU needs 0 < alpha <= 1, got alpha={self.alpha}.")

  def __call__(self, t: jax.Array) -> jax.Array:
    return self.alpha * t + (1.0 - self.alpha) * jax.nn.softplus(t)

  def derivative(self, t: jax.Array) -> jax.Array:
    return self.alpha + (1.0 - self.alpha) * jax.nn.sigmoid(t)

  def log_derivative(self, t: jax.Array) -> jax.Array:
    """log(α + (1−α)·sigmoid(t)) as a log-sum-exp, finite and accurate for any t."""
    if self.alpha == 1.0:
      return jnp.zeros_like(t)
    return jnp.logaddexp(jnp.log(self.alpha), jnp.log1p(-self.alpha) + jax.nn.log_sigmoid(t))

  def inverse(self, y: jax.Array, max_iterations: int = 100) -> jax.Array:
    """σ⁻¹(y) by Newton's method, vectorised, jit-able and differentiable.

    Start at t₀ = y for y ≥ 0 and t₀ = y/α for y < 0. Both satisfy σ(t₀) ≥ y (because
    softplus(t) ≥ max(t, 0)), so t₀ lies at or right of the root; σ being increasing and
    convex, Newton's iterates then decrease monotonically onto the root without overshoot.
    The safeguard keeps every step non-negative against rounding, and the loop stops once
    every step is below float precision of its iterate (or after `max_iterations`).

    Derivatives (forward and reverse mode, any order) come from implicit differentiation
    of σ(t) = y, not from the loop: ṫ = ẏ / σ'(t), exact up to the solver's tolerance.
    """
    return _newton_inverse(self, max_iterations, jnp.asarray(y))


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _newton_inverse(activation: SmoothLeakyReLU, max_iterations: int, y: jax.Array) -> jax.Array:
  t0 = jnp.where(y >= 0, y, y / activation.alpha)
  eps = jnp.finfo(t0.dtype).eps

  def newton_step(t):
    return jnp.maximum((activation(t) - y) / activation.derivative(t), 0.0)

  def not_converged(carry):
    iteration, _, step = carry
    return (iteration < max_iterations) & jnp.any(step > 0)

  def body(carry):
    iteration, t, _ = carry
    step = newton_step(t)
    step = jnp.where(step > eps * (1.0 + jnp.abs(t)), step, 0.0)
    return iteration + 1, t - step, step

  _, t, _ = jax.lax.while_loop(not_converged, body, (0, t0, jnp.ones_like(t0)))
  return t


@_newton_inverse.defjvp
def _newton_inverse_jvp(activation, max_iterations, primals, tangents):
  """σ(t(y)) = y  ⇒  σ'(t)·ṫ = ẏ: linear in ẏ, so JAX transposes it for reverse mode."""
  (y,), (y_dot,) = primals, tangents
  t = _newton_inverse(activation, max_iterations, y)
  return t, y_dot / activation.derivative(t)
