"""`ConditionalFlowMLP`: a dense flow for a conditional density p(x | c) (Flax Linen).

Each layer's pre-activation is shifted and scaled elementwise by functions of the context:

    h = conditioner(c)                                   (identity without a conditioner)
    y_k = (z_{k-1} W_k + b_k) ⊙ exp(s_k(h)) + t_k(h),    [s_k, t_k] = linear head of h
    z_k = σ(y_k) for k < L,   z_L = y_L

    log p(x | c) = Σ_i log N(z_L,i) + Σ_{k<L} Σ_i log σ'(y_k,i) + Σ_k Σ_i s_k,i(h) + Σ_k log|det W_k|.

The modulation sits *after* each `FlowDense`, so the layer's sown pre-activation stays
z W + b and its kernel gets the exact relative gradient; the conditioner and the head take
ordinary gradients through the chain. The head starts at zero: before training the flow is
the same for every context.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from flax_relgrad.activations import Activation, SmoothLeakyReLU
from flax_relgrad.flow import (
    Dtype,
    Initializer,
    Modulation,
    check_vectors,
    make_layers,
    stack_forward,
    stack_inverse,
    standard_normal_log_prob,
)


class ModulationHead(nn.Module):
  """Linear map from context features h (..., H) to every layer's (shift, log_scale) (..., D).

  Attributes:
    num_layers: number of flow layers L.
    scale: whether to produce log-scales (otherwise they are 0: shifts only).
    param_dtype: dtype of the parameters.
  """

  num_layers: int
  scale: bool = True
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, h: jax.Array, width: int) -> list[Modulation]:
    outputs = 2 if self.scale else 1
    dense = nn.Dense(
        self.num_layers * outputs * width, kernel_init=nn.initializers.zeros, param_dtype=self.param_dtype
    )
    values = dense(h).reshape(h.shape[:-1] + (self.num_layers, outputs, width))
    shifts = values[..., 0, :]
    log_scales = values[..., 1, :] if self.scale else jnp.zeros_like(shifts)
    return [(shifts[..., k, :], log_scales[..., k, :]) for k in range(self.num_layers)]


class ConditionalFlowMLP(nn.Module):
  """A dense flow for p(x | c): `FlowMLP` with context-dependent shifts and scales per layer.

  Every method takes the context c (..., C) with the same leading shape as x (..., D).

  Attributes:
    num_layers: number of dense layers L ≥ 1.
    conditioner: a Linen module mapping c (..., C) to features (..., H), e.g. a small MLP;
      None uses c itself (shifts and log-scales affine in c).
    activation: strictly increasing activation between layers.
    context_scale: whether the context also scales each layer (else shifts only).
    use_bias: whether the flow layers have biases.
    kernel_init: kernel initializer of the flow layers.
    param_dtype: dtype of the parameters.
  """

  num_layers: int = 2
  conditioner: nn.Module | None = None
  activation: Activation = SmoothLeakyReLU()
  context_scale: bool = True
  use_bias: bool = True
  kernel_init: Initializer = nn.initializers.orthogonal()
  param_dtype: Dtype = jnp.float32

  def setup(self):
    self.layers = make_layers(self.num_layers, self.use_bias, self.kernel_init, self.param_dtype)
    self.head = ModulationHead(self.num_layers, self.context_scale, self.param_dtype)

  def modulations(self, c: jax.Array, leading_shape: Sequence[int], width: int) -> list[Modulation]:
    """Every layer's (shift, log_scale), each of shape leading_shape + (D,)."""
    if c.ndim < 1 or tuple(c.shape[:-1]) != tuple(leading_shape):
      raise ValueError(
          f"ConditionalFlowMLP expects a context of shape {tuple(leading_shape) + ('C',)} "
          f"(the leading shape of x, then the context features), got {c.shape}."
      )
    features = c if self.conditioner is None else self.conditioner(c)
    return self.head(features, width)

  def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
    """Data x (..., D) → latent z (..., D) given c (..., C)."""
    return self.forward_and_log_det(x, c)[0]

  def forward_and_log_det(self, x: jax.Array, c: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Latent z (..., D) and the exact log|det ∂z/∂x| per example, shape (...)."""
    check_vectors(x)
    modulations = self.modulations(c, x.shape[:-1], x.shape[-1])
    z, log_det = stack_forward(self.layers, self.activation, x, modulations)
    return z, log_det + sum(layer.log_abs_det() for layer in self.layers)

  def log_prob(self, x: jax.Array, c: jax.Array) -> jax.Array:
    """Exact log p(x | c) per example, shape (...), under a standard normal base density."""
    z, log_det = self.forward_and_log_det(x, c)
    return standard_normal_log_prob(z) + log_det

  def inverse(self, z: jax.Array, c: jax.Array) -> jax.Array:
    """Latent z (..., D) → data x (..., D) given c (..., C)."""
    check_vectors(z, "latents")
    return stack_inverse(self.layers, self.activation, z, self.modulations(c, z.shape[:-1], z.shape[-1]))

  def sample(self, rng: jax.Array, c: jax.Array) -> jax.Array:
    """One draw x ~ p(x | c) per context row: shape c.shape[:-1] + (D,)."""
    kernel = self.layers[0].get_variable("params", "kernel")
    z = jax.random.normal(rng, c.shape[:-1] + (kernel.shape[-1],), kernel.dtype)
    return self.inverse(z, c)
