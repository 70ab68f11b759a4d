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

from flax_relgrad.activations import Activation
from flax_relgrad.activations import SmoothLeakyReLU
from flax_relgrad.flow import DiagonalGaussian
from flax_relgrad.flow import Dtype
from flax_relgrad.flow import GaussianParams
from flax_relgrad.flow import Initializer
from flax_relgrad.flow import Modulation
from flax_relgrad.flow import check_base
from flax_relgrad.flow import check_vectors
from flax_relgrad.flow import gaussian_log_prob
from flax_relgrad.flow import gaussian_sample
from flax_relgrad.flow import make_layers
from flax_relgrad.flow import sample_shape_tuple
from flax_relgrad.flow import stack_forward
from flax_relgrad.flow import stack_inverse


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

  Every method takes the context c (..., C) with the same leading shape as x (..., D);
  `sample(rng, c, sample_shape)` and `sample_and_log_prob(rng, c, sample_shape)` draw
  sample_shape + c.shape[:-1] + (D,). The base density does not depend on c.

  Attributes:
    num_layers: number of dense layers L ≥ 1.
    conditioner: a Linen module mapping c (..., C) to features (..., H), e.g. a small MLP;
      None uses c itself (shifts and log-scales affine in c).
    activation: strictly increasing activation between layers.
    context_scale: whether the context also scales each layer (else shifts only).
    use_bias: whether the flow layers have biases.
    kernel_init: kernel initializer of the flow layers.
    param_dtype: dtype of the parameters.
    base: "normal" or "diagonal_gaussian" (learned, as in `FlowMLP`).
  """

  num_layers: int = 2
  conditioner: nn.Module | None = None
  activation: Activation = SmoothLeakyReLU()
  context_scale: bool = True
  use_bias: bool = True
  kernel_init: Initializer = nn.initializers.orthogonal()
  param_dtype: Dtype = jnp.float32
  base: str = "normal"

  def setup(self):
    check_base(self.base)
    self.layers = make_layers(self.num_layers, self.use_bias, self.kernel_init, self.param_dtype)
    self.head = ModulationHead(self.num_layers, self.context_scale, self.param_dtype)
    if self.base == "diagonal_gaussian":
      self.base_distribution = DiagonalGaussian(self.param_dtype)

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
    check_vectors(x, width=self._width())
    if self.is_initializing():
      self._base_params(x.shape[-1])  # creates a learned base's params
    modulations = self.modulations(c, x.shape[:-1], x.shape[-1])
    z, log_det = stack_forward(self.layers, self.activation, x, modulations)
    return z, log_det + self._kernel_log_abs_det()

  def log_prob(self, x: jax.Array, c: jax.Array) -> jax.Array:
    """Exact log p(x | c) = log p_base(z) + log|det ∂z/∂x| per example, shape (...)."""
    z, log_det = self.forward_and_log_det(x, c)
    return gaussian_log_prob(z, self._base_params(z.shape[-1])) + log_det

  def inverse(self, z: jax.Array, c: jax.Array) -> jax.Array:
    """Latent z (..., D) → data x (..., D) given c (..., C)."""
    return self.inverse_and_log_det(z, c)[0]

  def inverse_and_log_det(self, z: jax.Array, c: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Data x = g⁻¹(z; c) (..., D) and log|det ∂x/∂z| per latent, shape (...)."""
    check_vectors(z, "latents", self._width())
    modulations = self.modulations(c, z.shape[:-1], z.shape[-1])
    x, log_det = stack_inverse(self.layers, self.activation, z, modulations)
    return x, -(log_det + self._kernel_log_abs_det())

  def sample(self, rng: jax.Array, c: jax.Array, sample_shape: int | Sequence[int] = ()) -> jax.Array:
    """Draws x ~ p(x | c): shape sample_shape + c.shape[:-1] + (D,) (one per context row
    for the default sample_shape=())."""
    z, c, _ = self._base_sample(rng, c, sample_shape)
    return self.inverse(z, c)

  def sample_and_log_prob(
      self, rng: jax.Array, c: jax.Array, sample_shape: int | Sequence[int] = ()
  ) -> tuple[jax.Array, jax.Array]:
    """Draws x (sample_shape + c.shape[:-1] + (D,)) and their exact log p(x | c)."""
    z, c, base = self._base_sample(rng, c, sample_shape)
    x, log_det = self.inverse_and_log_det(z, c)
    return x, gaussian_log_prob(z, base) - log_det

  def _base_sample(
      self, rng: jax.Array, c: jax.Array, sample_shape: int | Sequence[int]
  ) -> tuple[jax.Array, jax.Array, GaussianParams]:
    """Base draws z, the context broadcast to their leading shape, and the base's params."""
    kernel = self.layers[0].get_variable("params", "kernel")
    c = jnp.broadcast_to(c, sample_shape_tuple(sample_shape) + c.shape)
    base = self._base_params(kernel.shape[-1])
    return gaussian_sample(rng, c.shape[:-1] + kernel.shape[-1:], kernel.dtype, base), c, base

  def _kernel_log_abs_det(self) -> jax.Array:
    return sum(layer.log_abs_det() for layer in self.layers)

  def _width(self) -> int | None:
    if not self.layers[0].has_variable("params", "kernel"):
      return None
    return self.layers[0].get_variable("params", "kernel").shape[-1]

  def _base_params(self, width: int) -> GaussianParams:
    return self.base_distribution(width) if self.base == "diagonal_gaussian" else None
