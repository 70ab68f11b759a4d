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

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from flax_relgrad.activations import Activation
from flax_relgrad.activations import SmoothLeakyReLU
from flax_relgrad.core.dense import Dtype
from flax_relgrad.core.dense import Initializer
from flax_relgrad.core.distribution import ConditionalFlow
from flax_relgrad.core.distribution import check_context
from flax_relgrad.core.distribution import check_head_features
from flax_relgrad.core.distribution import split_modulations
from flax_relgrad.core.stack import Modulation
from flax_relgrad.core.stack import check_flow_settings
from flax_relgrad.flow import DiagonalGaussian
from flax_relgrad.flow import LinenFlowHooks
from flax_relgrad.flow import make_layers


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
    built = self.variables.get("params", {}).get("Dense_0")
    check_head_features(h, None if built is None else built["kernel"].shape[0])
    dense = nn.Dense(
      self.num_layers * outputs * width,
      kernel_init=nn.initializers.zeros,
      param_dtype=self.param_dtype,
    )
    return split_modulations(dense(h), self.num_layers, self.scale, width)


class ConditionalFlowMLP(LinenFlowHooks, ConditionalFlow, nn.Module):
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
    check_flow_settings(self.num_layers, self.base, 0, activation=self.activation)
    self.layers = make_layers(self.num_layers, self.use_bias, self.kernel_init, self.param_dtype)
    self.splines = None
    self.head = ModulationHead(self.num_layers, self.context_scale, self.param_dtype)
    if self.base == "diagonal_gaussian":
      self.base_distribution = DiagonalGaussian(self.param_dtype)

  def _modulations(
    self, context: tuple[jax.Array, ...], leading_shape: tuple[int, ...], width: int
  ) -> Sequence[Modulation]:
    c = check_context(context, leading_shape, type(self).__name__)
    features = c if self.conditioner is None else self.conditioner(c)
    return self.head(features, width)
