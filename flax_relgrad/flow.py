"""`FlowMLP`: an unconstrained dense normalizing flow as a Flax Linen module.

Row-vector convention (ENGINEERING.md §1). For a batch x of shape (B, D):

    y_k = z_{k-1} W_k + b_k,   z_0 = x,   W_k: (D, D),  b_k: (D,)
    z_k = σ(y_k) for k < L,    z_L = y_L  (no activation after the last layer)

    log p(x) = Σ_i log N(z_L,i; 0, 1) + Σ_{k<L} Σ_i log σ'(y_k,i) + Σ_k log|det W_k|.

Every layer sows its pre-activation y_k into the `intermediates` collection and passes it
through `perturb`, so that δ_k = ∂loss/∂y_k (per example) comes out of `jax.grad` with
respect to the `perturbations` collection. :func:`flax_relgrad.relative_jacobian` turns
those into the relative gradient at O(B·D²) per layer.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from flax_relgrad.activations import Activation, SmoothLeakyReLU

PREACTIVATION = "preactivation"
"""Name under which every flow layer sows y_k and registers its perturbation."""

Initializer = Callable[..., jax.Array]


def near_identity(scale: float = 0.01) -> Initializer:
  """Kernel initializer I + scale·N(0, 1/D): a flow that starts close to the identity."""

  def init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
    if len(shape) != 2 or shape[0] != shape[1]:
      raise ValueError(f"near_identity initializes square kernels only, got shape {shape}.")
    noise = jax.random.normal(key, shape, dtype) / math.sqrt(shape[0])
    return jnp.eye(shape[0], dtype=dtype) + scale * noise

  return init


class FlowDense(nn.Module):
  """One square dense layer y = z W + b of a flow (no activation).

  Attributes:
    use_bias: whether to add the bias b.
    kernel_init: initializer of the (D, D) kernel W.
    bias_init: initializer of the (D,) bias b.
    param_dtype: dtype of the parameters.
  """

  use_bias: bool = True
  kernel_init: Initializer = nn.initializers.orthogonal()
  bias_init: Initializer = nn.initializers.zeros
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    """Maps z (..., D) to y (..., D); sows and perturbs y under `PREACTIVATION`."""
    width = z.shape[-1]
    kernel = self.param("kernel", self.kernel_init, (width, width), self.param_dtype)
    y = z @ kernel
    if self.use_bias:
      y = y + self.param("bias", self.bias_init, (width,), self.param_dtype)
    self.sow("intermediates", PREACTIVATION, y)
    return self.perturb(PREACTIVATION, y)

  def inverse(self, y: jax.Array) -> jax.Array:
    """z = (y − b) W⁻¹ for y (..., D), with one LU factorisation of W per call."""
    kernel = self.get_variable("params", "kernel")
    if self.use_bias:
      y = y - self.get_variable("params", "bias")
    lu_and_pivots = jax.scipy.linalg.lu_factor(kernel)
    flat = y.reshape(-1, y.shape[-1])
    # z W = y  ⇔  Wᵀ zᵀ = yᵀ, hence trans=1.
    z = jax.scipy.linalg.lu_solve(lu_and_pivots, flat.T, trans=1).T
    return z.reshape(y.shape)

  def log_abs_det(self) -> jax.Array:
    """log|det W| (a scalar), O(D³) through `slogdet`."""
    return jnp.linalg.slogdet(self.get_variable("params", "kernel"))[1]


def _check_input(x: jax.Array) -> None:
  if x.ndim < 1 or x.shape[-1] < 1:
    raise ValueError(f"FlowMLP expects inputs of shape (..., D) with D >= 1, got {x.shape}.")


class FlowMLP(nn.Module):
  """A dense normalizing flow: `num_layers` square layers with activations in between.

  Data → latent is the forward direction. The width D is taken from the input; all
  kernels are D×D and unconstrained (no triangular or LU structure).

  Attributes:
    num_layers: number of dense layers L ≥ 1.
    activation: strictly increasing activation between layers (see `Activation`).
    use_bias: whether the layers have biases.
    kernel_init: kernel initializer (orthogonal by default; see `near_identity`).
    param_dtype: dtype of the parameters.
  """

  num_layers: int = 2
  activation: Activation = SmoothLeakyReLU()
  use_bias: bool = True
  kernel_init: Initializer = nn.initializers.orthogonal()
  param_dtype: Any = jnp.float32

  def setup(self):
    if self.num_layers < 1:
      raise ValueError(f"FlowMLP needs num_layers >= 1, got {self.num_layers}.")
    self.layers = [
        FlowDense(
            use_bias=self.use_bias, kernel_init=self.kernel_init, param_dtype=self.param_dtype
        )
        for _ in range(self.num_layers)
    ]

  def __call__(self, x: jax.Array) -> jax.Array:
    """Data x (..., D) → latent z (..., D)."""
    return self.forward_and_activation_log_det(x)[0]

  def forward_and_activation_log_det(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Latent z (..., D) and the activations' log-det Σ_{k<L} Σ_i log σ'(y_k,i), shape (...).

    This is the part of log|det ∂z/∂x| that depends on the example; the kernels' part
    Σ_k log|det W_k| is `kernel_log_abs_det()`. Training with `relative_jacobian`
    differentiates only this part (its gradient is O(B·D²)).
    """
    _check_input(x)
    z = x
    activation_log_det = jnp.zeros(x.shape[:-1], x.dtype)
    for index, layer in enumerate(self.layers):
      y = layer(z)
      if index == self.num_layers - 1:
        z = y
      else:
        activation_log_det = activation_log_det + self.activation.log_derivative(y).sum(-1)
        z = self.activation(y)
    return z, activation_log_det

  def kernel_log_abs_det(self) -> jax.Array:
    """Σ_k log|det W_k| (a scalar), O(L·D³)."""
    return sum(layer.log_abs_det() for layer in self.layers)

  def forward_and_log_det(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Latent z (..., D) and the exact log|det ∂z/∂x| per example, shape (...)."""
    z, activation_log_det = self.forward_and_activation_log_det(x)
    return z, activation_log_det + self.kernel_log_abs_det()

  def log_prob(self, x: jax.Array) -> jax.Array:
    """Exact log p(x) per example, shape (...), under a standard normal base density."""
    z, log_det = self.forward_and_log_det(x)
    return standard_normal_log_prob(z) + log_det

  def inverse(self, z: jax.Array) -> jax.Array:
    """Latent z (..., D) → data x (..., D): linear solves and Newton-inverted activations."""
    _check_input(z)
    y = z
    for index in reversed(range(self.num_layers)):
      if index != self.num_layers - 1:
        y = self.activation.inverse(y)
      y = self.layers[index].inverse(y)
    return y

  def sample(self, rng: jax.Array, num_samples: int) -> jax.Array:
    """`num_samples` draws x = g⁻¹(z), z ~ N(0, I): shape (num_samples, D)."""
    width = self.layers[0].get_variable("params", "kernel").shape[0]
    kernel_dtype = self.layers[0].get_variable("params", "kernel").dtype
    return self.inverse(jax.random.normal(rng, (num_samples, width), kernel_dtype))


def standard_normal_log_prob(z: jax.Array) -> jax.Array:
  """Σ_i log N(z_i; 0, 1) over the last axis: shape z.shape[:-1]."""
  return -0.5 * (jnp.square(z).sum(-1) + z.shape[-1] * math.log(2 * math.pi))
