"""The five flows the scaling benchmark times, and one training step of each.

Methods, all with L square layers, SmoothLeakyReLU(α) between layers, float32, batch x (B, D):

- ``relative``: `FlowMLP`, `fr.relative_update` (the relative gradient, the library's one
  training step) + Adam. Exact maximum likelihood at O(B·D²) per layer (docs/method.md, "Cost").
- ``splines``: ``relative`` with a learned K-bin `RationalQuadraticSpline` on every coordinate
  before every dense layer (`FlowMLP(spline_bins=K)`); a spline adds O(B·D·K) elementwise work
  per layer, so its column over ``relative`` is what the splines cost.
- ``naive``: `FlowMLP`, `value_and_exact_grad` (autodiff through `slogdet`) + Adam. O(D³).
- ``plain``: `FlowMLP` trained on −[Σ log N(z) + Σ log σ'(y)] only (no log|det W|), plain
  `jax.grad` + Adam: the backprop floor of a dense network of this shape.
- ``lu``: `LUFlow`, Glow-style W = P·L·(U + diag(s)), log|det W| = Σ log|s|; exact NLL,
  plain autodiff + Adam. O(B·D²), but W is constrained to its LU parameterisation.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import flax_relgrad as fr

PyTree = Any

StepFn = Callable[[PyTree, PyTree, jax.Array], tuple[PyTree, PyTree, jax.Array]]
"""(params, opt_state, x (B, D)) → (params, opt_state, loss)."""

METHODS = ("relative", "splines", "naive", "plain", "lu")
COST_EXPONENT = {"relative": 2, "splines": 2, "naive": 3, "plain": 2, "lu": 2}
"""Nominal k in cost ∝ D^k (docs/method.md, "Cost"), used to predict whether a point exceeds the cap."""


class LUDense(nn.Module):
  """y = z W + b with W = P·L·(U + diag(s)) (Kingma & Dhariwal, 2018), for z (..., D).

  P is a fixed permutation (drawn from `permutation_seed`), L is unit lower triangular, U
  strictly upper triangular, and log|det W| = Σ_i log|s_i| costs O(D). The parameters
  start at L = I, U = 0, s = 1 (W = P).

  Attributes:
    permutation_seed: seed of the fixed permutation P.
  """

  permutation_seed: int = 0

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    width = z.shape[-1]
    permutation = np.random.default_rng(self.permutation_seed).permutation(width)
    lower = self.param("lower", nn.initializers.zeros, (width, width))
    upper = self.param("upper", nn.initializers.zeros, (width, width))
    scale = self.param("scale", nn.initializers.ones, (width,))
    bias = self.param("bias", nn.initializers.zeros, (width,))
    unit_lower = jnp.tril(lower, -1) + jnp.eye(width, dtype=lower.dtype)
    upper_and_diagonal = jnp.triu(upper, 1) + jnp.diag(scale)
    # z P permutes the coordinates of z: (z P)_j = z_{π(j)} for P_{π(j), j} = 1.
    return (z[..., permutation] @ unit_lower) @ upper_and_diagonal + bias

  def log_abs_det(self) -> jax.Array:
    """log|det W| = Σ_i log|s_i| (a scalar)."""
    return jnp.sum(jnp.log(jnp.abs(self.get_variable("params", "scale"))))


class LUFlow(nn.Module):
  """`num_layers` `LUDense` layers with `activation` in between (none after the last).

  Attributes:
    num_layers: L ≥ 1.
    activation: strictly increasing activation with a log-derivative.
  """

  num_layers: int = 2
  activation: fr.Activation = fr.SmoothLeakyReLU()

  def setup(self):
    self.layers = [LUDense(permutation_seed=index) for index in range(self.num_layers)]

  def __call__(self, x: jax.Array) -> jax.Array:
    """Data x (..., D) → latent z (..., D)."""
    return self.log_prob(x)

  def log_prob(self, x: jax.Array) -> jax.Array:
    """Exact log p(x) per example, shape (...): log N(z) + Σ log σ'(y) + Σ_k Σ_i log|s_k,i|."""
    z = x
    log_det = jnp.zeros(x.shape[:-1], x.dtype)
    for index, layer in enumerate(self.layers):
      z = layer(z)
      log_det = log_det + layer.log_abs_det()
      if index < self.num_layers - 1:
        log_det = log_det + self.activation.log_derivative(z).sum(-1)
        z = self.activation(z)
    return fr.standard_normal_log_prob(z) + log_det


@dataclasses.dataclass(frozen=True)
class Method:
  """A model, its optimizer and one training step (params, opt_state, x) → (params, opt_state, loss)."""

  name: str
  model: nn.Module
  tx: optax.GradientTransformation
  step: StepFn


def _euclidean_step(
  value_and_grad_fn: Callable[[PyTree, jax.Array], tuple[jax.Array, PyTree]],
  tx: optax.GradientTransformation,
) -> StepFn:
  """One `tx` step on the Euclidean gradient from value_and_grad_fn(params, x) → (loss, grads)."""

  def step(params, opt_state, x):
    loss, grads = value_and_grad_fn(params, x)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return step


def make_method(
  name: str, num_layers: int, alpha: float, learning_rate: float, spline_bins: int = 8
) -> Method:
  """The model, optimizer and training step of benchmark method `name` (one of `METHODS`);
  `spline_bins` is K of the ``splines`` method."""
  activation = fr.SmoothLeakyReLU(alpha)
  adam = optax.adam(learning_rate)
  if name == "lu":
    model = LUFlow(num_layers, activation)
    nll = lambda params, x: -jnp.mean(model.apply({"params": params}, x, method=LUFlow.log_prob))
    return Method(name, model, adam, _euclidean_step(jax.value_and_grad(nll), adam))
  if name == "splines":  # The library's step with splines on [-4, 4], where the data lie.
    model = fr.FlowMLP(num_layers, activation, spline_bins=spline_bins, spline_bound=4.0)
    return Method(name, model, adam, functools.partial(fr.relative_update, model, adam))
  model = fr.FlowMLP(num_layers, activation)
  if name == "relative":  # The library's step: exact NLL at O(B·D²) per layer.
    return Method(name, model, adam, functools.partial(fr.relative_update, model, adam))
  if name == "naive":  # Autodiff through slogdet.
    exact = functools.partial(fr.value_and_exact_grad, model)
    return Method(name, model, adam, _euclidean_step(exact, adam))
  if name == "plain":  # −[Σ log N(z) + Σ log σ'(y)]: no log|det W| at all.

    def loss_fn(params, x):
      z, activation_log_det = model.apply(
        {"params": params}, x, method=fr.FlowMLP.forward_and_activation_log_det
      )
      return -jnp.mean(fr.standard_normal_log_prob(z) + activation_log_det)

    return Method(name, model, adam, _euclidean_step(jax.value_and_grad(loss_fn), adam))
  raise ValueError(f"Unknown method {name!r}; expected one of {METHODS}.")
