"""Dense flow layers and `FlowMLP`, an unconstrained dense normalizing flow (Flax Linen).

Row-vector convention (docs/method.md §1). For inputs x of shape (..., D):

    y_k = z_{k-1} W_k + b_k,   z_0 = x,   W_k: (D, D),  b_k: (D,)
    z_k = σ(y_k) for k < L,    z_L = y_L  (no activation after the last layer)

    log p(x) = Σ_i log N(z_L,i; 0, 1) + Σ_{k<L} Σ_i log σ'(y_k,i) + Σ_k log|det W_k|.

with N(0, 1) the default base; `base="diagonal_gaussian"` learns N(loc_i, exp(log_scale_i)²).
`spline_bins=K` inserts a learned elementwise spline before every layer (z_{k-1} ← s_k(z_{k-1}),
adding Σ_i log s_k,i' to log p; see `flax_relgrad.splines`).

Relative-gradient bookkeeping. `FlowDense` is the only place where it happens, and it is
invisible in a plain `model.apply`. Inside :func:`flax_relgrad.value_and_relative_grad`
every call of a flow layer

- sows its pre-activation y into the `intermediates` collection under `PREACTIVATION` (one
  tuple entry per call) and adds a zero perturbation to it, kept in the `perturbations`
  collection under the same name, so that the gradient with respect to the perturbation is
  δ = ∂loss/∂y;
- replaces the value of `log_abs_det()` by a scalar placeholder in `perturbations` under
  `LOG_ABS_DET`, so that the gradient with respect to it is λ = ∂loss/∂log|det W|, however
  the loss weighs that term (a batch mean, a sum over T sequence positions or H·W pixels, a
  mask), and no O(D³) `slogdet` is computed.

From y, δ and λ, :func:`flax_relgrad.value_and_relative_grad` computes the relative gradient
in O(B·D²) per layer (`flax_relgrad.relative`).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from flax_relgrad.activations import Activation
from flax_relgrad.activations import SmoothLeakyReLU
from flax_relgrad.splines import RationalQuadraticSpline

PREACTIVATION = "preactivation"
"""Name under which a flow layer sows y (`intermediates`) and keeps its δ (`perturbations`)."""

LOG_ABS_DET = "log_abs_det"
"""Name of a flow layer's log|det W| placeholder in the `perturbations` collection."""

INTERMEDIATES = "intermediates"
PERTURBATIONS = "perturbations"

Initializer = Callable[..., jax.Array]
Dtype = Any


def near_identity(scale: float = 0.01) -> Initializer:
  """Kernel initializer I + scale·N(0, 1/D): a flow that starts close to the identity."""

  def init(key: jax.Array, shape: tuple[int, ...], dtype: Dtype = jnp.float32) -> jax.Array:
    if len(shape) != 2 or shape[0] != shape[1]:
      raise ValueError(f"near_identity initializes square kernels only, got shape {shape}.")
    noise = jax.random.normal(key, shape, dtype) / math.sqrt(shape[0])
    return jnp.eye(shape[0], dtype=dtype) + scale * noise

  return init


def factorisation_dtype(dtype: Dtype) -> Dtype:
  """The dtype LU/QR factorisations run in: at least float32 (LAPACK has no bfloat16/float16)."""
  return jnp.promote_types(dtype, jnp.float32)


class FlowDense(nn.Module):
  """One square dense layer y = z W + b of a flow (no activation), W unconstrained.

  Applied to z of shape (..., D) it maps every D-vector: on a (B, T, D) sequence it acts per
  position, on a (B, H, W, C) image it is an invertible 1×1 convolution (Glow). Each example
  then holds several D-vectors and its log-det holds log|det W| that many times; compute it
  with `forward_and_log_det(z, event_ndims)`, and the relative gradient picks up the weight
  from the loss automatically.

  Contract for layers built around it (what keeps the relative gradient exact): the sown
  pre-activation is exactly z @ kernel + bias with this layer's own `kernel` and `bias`
  params; the loss depends on them only through y and `log_abs_det()`. Context-dependent
  shifts or scales go *after* the layer, in another module (as in `ConditionalFlowMLP`),
  never into its y. `value_and_relative_grad` refuses a flow layer whose params hold anything
  but `kernel` and `bias`.

  Attributes:
    use_bias: whether to add the bias b.
    kernel_init: initializer of the (D, D) kernel W (run in at least float32, then cast).
    bias_init: initializer of the (D,) bias b.
    param_dtype: dtype of the parameters.
  """

  use_bias: bool = True
  kernel_init: Initializer = nn.initializers.orthogonal()
  bias_init: Initializer = nn.initializers.zeros
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    """Maps z (..., D) to y = z W + b (..., D)."""
    width = z.shape[-1]
    kernel = self.param("kernel", self._init_kernel, (width, width))
    y = z @ kernel
    if self.use_bias:
      y = y + self.param("bias", self.bias_init, (width,), self.param_dtype)
    return self._track_preactivation(y)

  def _init_kernel(self, key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    return self.kernel_init(key, shape, factorisation_dtype(self.param_dtype)).astype(
        self.param_dtype
    )

  def _track_preactivation(self, y: jax.Array) -> jax.Array:
    """Sows y and adds this call's perturbation (a no-op outside the relative-gradient pass)."""
    if self.is_initializing():
      return y
    call = len(self.get_variable(INTERMEDIATES, PREACTIVATION, ()))
    if not self.sow(INTERMEDIATES, PREACTIVATION, y):
      return y
    if self.is_mutable_collection(PERTURBATIONS):  # the shape-only discovery pass
      known = self.get_variable(PERTURBATIONS, PREACTIVATION, ())
      self.put_variable(PERTURBATIONS, PREACTIVATION, known + (jnp.zeros_like(y),))
      return y
    if not self.has_variable(PERTURBATIONS, PREACTIVATION):
      return y
    perturbations = self.get_variable(PERTURBATIONS, PREACTIVATION)
    if call >= len(perturbations):
      raise ValueError(
          f"FlowDense '{'/'.join(self.path)}': the perturbations hold no entry for call "
          f"{call + 1} of this layer; they must be made from the same call "
          "(flax_relgrad.value_and_relative_grad builds them)."
      )
    return y + perturbations[call]

  def log_abs_det(self) -> jax.Array:
    """log|det W| (a scalar) by `slogdet`, O(D³), in at least float32; in the
    relative-gradient pass, the placeholder that stands for it (no slogdet)."""
    if self.is_mutable_collection(PERTURBATIONS) and not self.is_initializing():
      value = kernel_log_abs_det(self.get_variable("params", "kernel"))
      self.put_variable(PERTURBATIONS, LOG_ABS_DET, jnp.zeros_like(value))
      return value
    if self.has_variable(PERTURBATIONS, LOG_ABS_DET):
      return self.get_variable(PERTURBATIONS, LOG_ABS_DET)
    return kernel_log_abs_det(self.get_variable("params", "kernel"))

  def forward_and_log_det(self, z: jax.Array, event_ndims: int = 1) -> tuple[jax.Array, jax.Array]:
    """y = z W + b and the log-det per example.

    Args:
      z: input (..., D).
      event_ndims: how many trailing axes of z form one example: 1 for vectors, 2 for a
        (T, D) sequence, 3 for an (H, W, C) image.

    Returns:
      y (same shape as z) and log|det ∂y/∂z| = n·log|det W| of shape z.shape[:-event_ndims],
      n = the number of D-vectors per example (T, H·W, ...).
    """
    return dense_forward_and_log_det(self, z, event_ndims)

  def inverse(self, y: jax.Array) -> jax.Array:
    """z = (y − b) W⁻¹ for y (..., D), with one LU factorisation of W per call."""
    bias = self.get_variable("params", "bias") if self.use_bias else None
    return dense_inverse(self.get_variable("params", "kernel"), bias, y)


def dense_forward_and_log_det(layer: Any, z: jax.Array, event_ndims: int) -> tuple[jax.Array, jax.Array]:
  """`layer(z)` and n·`layer.log_abs_det()` per example, for a Linen or NNX `FlowDense`."""
  if not 1 <= event_ndims <= z.ndim:
    raise ValueError(f"event_ndims must be in [1, {z.ndim}] for an input of shape {z.shape}.")
  vectors_per_example = math.prod(z.shape[z.ndim - event_ndims : -1])
  y = layer(z)
  log_det = vectors_per_example * layer.log_abs_det()
  return y, jnp.broadcast_to(log_det, z.shape[: z.ndim - event_ndims])


def dense_inverse(kernel: jax.Array, bias: jax.Array | None, y: jax.Array) -> jax.Array:
  """z = (y − b) W⁻¹ for y (..., D): one LU factorisation of the (D, D) kernel, in at least
  float32; differentiable (reverse mode through the LU solve)."""
  if bias is not None:
    y = y - bias
  dtype = factorisation_dtype(y.dtype)
  lu_and_pivots = jax.scipy.linalg.lu_factor(kernel.astype(dtype))
  flat = y.reshape(-1, y.shape[-1]).astype(dtype)
  # z W = y  ⇔  Wᵀ zᵀ = yᵀ, hence trans=1.
  z = jax.scipy.linalg.lu_solve(lu_and_pivots, flat.T, trans=1).T
  return z.reshape(y.shape).astype(y.dtype)


def kernel_log_abs_det(kernel: jax.Array) -> jax.Array:
  """log|det W| of a (..., D, D) kernel through `slogdet`, in at least float32."""
  return jnp.linalg.slogdet(kernel.astype(factorisation_dtype(kernel.dtype)))[1]


def check_vectors(x: jax.Array, name: str = "inputs", width: int | None = None) -> None:
  """Refuses anything but a non-empty array of D-vectors (..., D), D = `width` if given."""
  if x.ndim < 1 or x.shape[-1] < 1:
    raise ValueError(f"The flow expects {name} of shape (..., D) with D >= 1, got {x.shape}.")
  if width is not None and x.shape[-1] != width:
    raise ValueError(f"The flow has D = {width} ({width}×{width} kernels) but got {name} of shape {x.shape}.")
  if x.size == 0:
    raise ValueError(f"The flow got empty {name} of shape {x.shape}.")


def sample_shape_tuple(sample_shape: int | Sequence[int]) -> tuple[int, ...]:
  """`sample_shape` as a tuple: 8 → (8,), (2, 5) → (2, 5), () → ()."""
  shape = (sample_shape,) if isinstance(sample_shape, int) else sample_shape
  if not isinstance(shape, (tuple, list)) or not all(isinstance(n, int) and n >= 0 for n in shape):
    raise ValueError(f"sample_shape must be an int or a tuple of ints >= 0, got {sample_shape!r}.")
  return tuple(shape)


Modulation = tuple[jax.Array, jax.Array]
"""(shift, log_scale) applied to one layer's pre-activation: y ← y·exp(log_scale) + shift."""


def stack_forward(
    layers: Sequence[FlowDense],
    activation: Activation,
    x: jax.Array,
    modulations: Sequence[Modulation] | None = None,
    splines: Sequence[RationalQuadraticSpline] | None = None,
) -> tuple[jax.Array, jax.Array]:
  """z and the example-dependent part of log|det ∂z/∂x| of a dense stack, shape x.shape[:-1].

  That part is Σ_{k<L} Σ_i log σ'(y_k,i), plus Σ_k Σ_i log_scale_k,i for modulated layers
  and Σ_k Σ_i log s_k,i'(·) for splines (spline k acts on layer k's input); the kernels'
  Σ_k log|det W_k| is not included.
  """
  z = x
  log_det = jnp.zeros(x.shape[:-1], x.dtype)
  for index, layer in enumerate(layers):
    if splines is not None:
      z, spline_log_det = splines[index].forward_and_log_det(z)
      log_det = log_det + spline_log_det
    y = layer(z)
    if modulations is not None:
      shift, log_scale = modulations[index]
      y = y * jnp.exp(log_scale) + shift
      log_det = log_det + log_scale.sum(-1)
    if index == len(layers) - 1:
      z = y
    else:
      log_det = log_det + activation.log_derivative(y).sum(-1)
      z = activation(y)
  return z, log_det


def stack_inverse(
    layers: Sequence[FlowDense],
    activation: Activation,
    z: jax.Array,
    modulations: Sequence[Modulation] | None = None,
    splines: Sequence[RationalQuadraticSpline] | None = None,
) -> tuple[jax.Array, jax.Array]:
  """x = g⁻¹(z) of a dense stack (linear solves, Newton-inverted activations, closed-form
  spline inverses), and the same example-dependent part of log|det ∂z/∂x| at x that
  `stack_forward` returns."""
  y = z
  log_det = jnp.zeros(z.shape[:-1], z.dtype)
  for index in reversed(range(len(layers))):
    if index != len(layers) - 1:
      # The activation's Newton iteration needs float32 precision at least.
      y = activation.inverse(y.astype(factorisation_dtype(y.dtype))).astype(y.dtype)
      log_det = log_det + activation.log_derivative(y).sum(-1)
    if modulations is not None:
      shift, log_scale = modulations[index]
      y = (y - shift) * jnp.exp(-log_scale)
      log_det = log_det + log_scale.sum(-1)
    y = layers[index].inverse(y)
    if splines is not None:
      y = splines[index].inverse(y)
      log_det = log_det + splines[index].forward_and_log_det(y)[1]
  return y, log_det


def make_layers(num_layers: int, use_bias: bool, kernel_init: Initializer, param_dtype: Dtype):
  if num_layers < 1:
    raise ValueError(f"A dense flow needs num_layers >= 1, got {num_layers}.")
  return [
      FlowDense(use_bias=use_bias, kernel_init=kernel_init, param_dtype=param_dtype)
      for _ in range(num_layers)
  ]


BASES = ("normal", "diagonal_gaussian")
"""Base densities of the flows: N(0, I), or N(loc, diag(exp(2·log_scale))) with learned
loc and log_scale (D,) (both start at 0). The base's params are ordinary leaves: they take
their ordinary gradient next to the flow layers' relative one."""


def check_base(base: str) -> None:
  if base not in BASES:
    raise ValueError(f"base must be one of {BASES}, got {base!r}.")


def check_spline_bins(spline_bins: int) -> None:
  if spline_bins < 0:
    raise ValueError(f"spline_bins must be >= 0 (0: no splines), got {spline_bins}.")


class DiagonalGaussian(nn.Module):
  """The learned base N(loc, diag(exp(2·log_scale))): params `loc` and `log_scale`, (D,).

  Attributes:
    param_dtype: dtype of the parameters.
  """

  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, width: int) -> tuple[jax.Array, jax.Array]:
    """(loc, log_scale), each (D,)."""
    loc = self.param("loc", nn.initializers.zeros, (width,), self.param_dtype)
    return loc, self.param("log_scale", nn.initializers.zeros, (width,), self.param_dtype)


GaussianParams = tuple[jax.Array, jax.Array] | None
"""(loc, log_scale) of a learned diagonal Gaussian base, or None for N(0, I)."""


def gaussian_log_prob(z: jax.Array, base: GaussianParams) -> jax.Array:
  """Σ_i log N(z_i; loc_i, exp(log_scale_i)²) over the last axis (standard normal for None)."""
  if base is None:
    return standard_normal_log_prob(z)
  loc, log_scale = base
  return standard_normal_log_prob((z - loc) * jnp.exp(-log_scale)) - log_scale.sum(-1)


def gaussian_sample(rng: jax.Array, shape: tuple[int, ...], dtype: Dtype, base: GaussianParams) -> jax.Array:
  """Draws of shape `shape` (..., D): ε ~ N(0, I), then loc + exp(log_scale)·ε."""
  noise = jax.random.normal(rng, shape, dtype)
  if base is None:
    return noise
  loc, log_scale = base
  return loc + jnp.exp(log_scale) * noise


class FlowMLP(nn.Module):
  """A dense normalizing flow: `num_layers` square layers with activations in between.

  Data → latent is the forward direction. The width D is taken from the input; all kernels
  are D×D and unconstrained (no triangular or LU structure). Every method maps the last axis
  and keeps any leading batch shape; inputs must be non-empty and have the kernels' D.

  Distribution methods (flowjax/distrax naming): `log_prob(x)`, `sample(rng, sample_shape)`,
  `sample_and_log_prob(rng, sample_shape)`, and the bijection's `forward_and_log_det(x)`
  (data → latent) and `inverse_and_log_det(z)` (latent → data). Sampling is differentiable
  (implicit differentiation of the activation's Newton inverse, autodiff through the solves).

  Attributes:
    num_layers: number of dense layers L ≥ 1.
    activation: strictly increasing activation between layers (see `Activation`).
    use_bias: whether the layers have biases.
    kernel_init: kernel initializer (orthogonal by default; see `near_identity`).
    param_dtype: dtype of the parameters (bfloat16 works: factorisations run in float32).
    base: the base density, "normal" (N(0, I), no params) or "diagonal_gaussian" (params
      `base_distribution/loc` and `base_distribution/log_scale`, see `BASES`).
    spline_bins: K > 0 puts a learned elementwise `RationalQuadraticSpline` with K bins
      before every dense layer (params `splines_k`, identity at init; O(D·K) per example);
      0 (default): none.
    spline_bound: the splines' interval [−B, B] (identity outside it); it should cover the
      bulk of each layer's input (e.g. ±14 for MNIST in logit space).
  """

  num_layers: int = 2
  activation: Activation = SmoothLeakyReLU()
  use_bias: bool = True
  kernel_init: Initializer = nn.initializers.orthogonal()
  param_dtype: Dtype = jnp.float32
  base: str = "normal"
  spline_bins: int = 0
  spline_bound: float = 4.0

  def setup(self):
    check_base(self.base)
    self.layers = make_layers(self.num_layers, self.use_bias, self.kernel_init, self.param_dtype)
    check_spline_bins(self.spline_bins)
    self.splines = [
        RationalQuadraticSpline(self.spline_bins, self.spline_bound, self.param_dtype)
        for _ in range(self.num_layers)
    ] if self.spline_bins else None
    if self.base == "diagonal_gaussian":
      self.base_distribution = DiagonalGaussian(self.param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    """Data x (..., D) → latent z (..., D)."""
    return self.forward_and_activation_log_det(x)[0]

  def forward_and_activation_log_det(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Latent z (..., D) and the elementwise parts' log-det, shape (...): the activations'
    Σ_{k<L} Σ_i log σ'(y_k,i), plus the splines' Σ_k Σ_i log s_k,i'(·) if there are any.

    This is the part of log|det ∂z/∂x| that depends on the example; the kernels' part
    Σ_k log|det W_k| is `kernel_log_abs_det()`.
    """
    check_vectors(x, width=self._width())
    if self.is_initializing():
      self._base_params(x.shape[-1])  # creates a learned base's params
    return stack_forward(self.layers, self.activation, x, splines=self.splines)

  def kernel_log_abs_det(self) -> jax.Array:
    """Σ_k log|det W_k| (a scalar): O(L·D³) in a plain apply, free in the relative pass."""
    return sum(layer.log_abs_det() for layer in self.layers)

  def forward_and_log_det(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Latent z (..., D) and the exact log|det ∂z/∂x| per example, shape (...)."""
    z, activation_log_det = self.forward_and_activation_log_det(x)
    return z, activation_log_det + self.kernel_log_abs_det()

  def log_prob(self, x: jax.Array) -> jax.Array:
    """Exact log p(x) = log p_base(z) + log|det ∂z/∂x| per example, shape (...)."""
    z, log_det = self.forward_and_log_det(x)
    return self.base_log_prob(z) + log_det

  def base_log_prob(self, z: jax.Array) -> jax.Array:
    """log p_base(z) per latent (..., D), shape (...)."""
    return gaussian_log_prob(z, self._base_params(z.shape[-1]))

  def inverse(self, z: jax.Array) -> jax.Array:
    """Latent z (..., D) → data x (..., D): linear solves and Newton-inverted activations."""
    check_vectors(z, "latents", self._width())
    return stack_inverse(self.layers, self.activation, z, splines=self.splines)[0]

  def inverse_and_log_det(self, z: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Data x = g⁻¹(z) (..., D) and log|det ∂x/∂z| per latent, shape (...)."""
    check_vectors(z, "latents", self._width())
    x, activation_log_det = stack_inverse(self.layers, self.activation, z, splines=self.splines)
    return x, -(activation_log_det + self.kernel_log_abs_det())

  def sample(self, rng: jax.Array, sample_shape: int | Sequence[int] = ()) -> jax.Array:
    """Draws x = g⁻¹(z), z ~ p_base: shape sample_shape + (D,) (`sample(rng, 8)`: (8, D))."""
    return self.inverse(self._base_sample(rng, sample_shape))

  def sample_and_log_prob(
      self, rng: jax.Array, sample_shape: int | Sequence[int] = ()
  ) -> tuple[jax.Array, jax.Array]:
    """Draws x (sample_shape + (D,)) and their exact log p(x) (sample_shape), one pass."""
    z = self._base_sample(rng, sample_shape)
    x, log_det = self.inverse_and_log_det(z)
    return x, self.base_log_prob(z) - log_det

  def _width(self) -> int | None:
    """D, from the first kernel; None while initializing."""
    if not self.layers[0].has_variable("params", "kernel"):
      return None
    return self.layers[0].get_variable("params", "kernel").shape[-1]

  def _base_params(self, width: int) -> GaussianParams:
    return self.base_distribution(width) if self.base == "diagonal_gaussian" else None

  def _base_sample(self, rng: jax.Array, sample_shape: int | Sequence[int]) -> jax.Array:
    kernel = self.layers[0].get_variable("params", "kernel")
    shape = sample_shape_tuple(sample_shape) + (kernel.shape[-1],)
    return gaussian_sample(rng, shape, kernel.dtype, self._base_params(kernel.shape[-1]))


def standard_normal_log_prob(z: jax.Array) -> jax.Array:
  """Σ_i log N(z_i; 0, 1) over the last axis: shape z.shape[:-1]."""
  return -0.5 * (jnp.square(z).sum(-1) + z.shape[-1] * math.log(2 * math.pi))
