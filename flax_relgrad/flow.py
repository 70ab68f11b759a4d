"""Dense flow layers and `FlowMLP`, an unconstrained dense normalizing flow (Flax Linen).

Row-vector convention (docs/method.md §1). For inputs x of shape (..., D):

    y_k = z_{k-1} W_k + b_k,   z_0 = x,   W_k: (D, D),  b_k: (D,)
    z_k = σ(y_k) for k < L,    z_L = y_L  (no activation after the last layer)

    log p(x) = Σ_i log N(z_L,i; 0, 1) + Σ_{k<L} Σ_i log σ'(y_k,i) + Σ_k log|det W_k|.

with N(0, 1) the default base; `base="diagonal_gaussian"` learns N(loc_i, exp(log_scale_i)²).
`spline_bins=K` inserts a learned elementwise spline before every layer (z_{k-1} ← s_k(z_{k-1}),
adding Σ_i log s_k,i' to log p; see `flax_relgrad.splines`), or, with
`spline_placement="input"`, before the first layer only. The maths is the framework-free
core's (`flax_relgrad.core`); this module binds it to Linen.

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
in O(B·D²) per layer (`flax_relgrad.relative`). The pass is marked by `relative_pass()`, not
by which collections are mutable: a plain `apply(..., mutable=True)` (or variables that hold
a `perturbations` collection it returned) computes the exact log|det W| and makes no
perturbations. Outside the pass, `intermediates`, when mutable, still receive every y.
"""

from __future__ import annotations

from collections.abc import Iterator
from collections.abc import Sequence
import contextlib
import contextvars
import types

import flax.core.lift
import flax.core.scope
import flax.linen as nn
import jax
import jax.numpy as jnp

from flax_relgrad.activations import Activation
from flax_relgrad.activations import SmoothLeakyReLU
from flax_relgrad.core.dense import INVERSE_IN_RELATIVE_PASS
from flax_relgrad.core.dense import LOG_ABS_DET
from flax_relgrad.core.dense import PREACTIVATION
from flax_relgrad.core.dense import DenseMethods
from flax_relgrad.core.dense import Dtype
from flax_relgrad.core.dense import Initializer
from flax_relgrad.core.dense import init_kernel
from flax_relgrad.core.dense import kernel_log_abs_det
from flax_relgrad.core.dense import relative_pass_params
from flax_relgrad.core.distribution import Flow
from flax_relgrad.core.distribution import FlowMethods
from flax_relgrad.core.stack import GaussianParams
from flax_relgrad.core.stack import check_flow_settings
from flax_relgrad.core.stack import spline_count
from flax_relgrad.relative import differentiates
from flax_relgrad.relative import enclosing_sources
from flax_relgrad.splines import RationalQuadraticSpline

INTERMEDIATES = "intermediates"
PERTURBATIONS = "perturbations"


_IN_RELATIVE_PASS: contextvars.ContextVar[bool] = contextvars.ContextVar(
  "linen_relative_pass", default=False
)
_OWN_GRADIENTS: contextvars.ContextVar[bool] = contextvars.ContextVar(
  "linen_own_gradients", default=False
)
_DISCOVERY_FRAME: contextvars.ContextVar[types.FrameType | None] = contextvars.ContextVar(
  "linen_discovery_frame", default=None
)


@contextlib.contextmanager
def relative_pass(
  own_gradients: bool = False, discovery_frame: types.FrameType | None = None
) -> Iterator[None]:
  """Marks the relative-gradient pass (`value_grad_and_relative_args` applies the loss in
  it): only inside it do flow layers make or read `perturbations`.

  In the pass each flow layer computes y from `stop_gradient` of its kernel and bias, so
  their autodiff gradient holds only what the loss does with them besides the layer (a
  penalty on W, a tied weight; zero for a plain likelihood). With `own_gradients` (for
  `relative_jacobian()`), the layer adds zero stand-ins to them, kept in `perturbations`
  under `kernel` and `bias`, whose gradient is the layer's own Euclidean one (zᵀδ, Σ δ).
  `discovery_frame`, the frame that applies the loss in the shape-only discovery pass,
  bounds the layers' search of the call stack for what they are applied under."""
  in_pass = _IN_RELATIVE_PASS.set(True)
  own = _OWN_GRADIENTS.set(own_gradients)
  frame = _DISCOVERY_FRAME.set(discovery_frame)
  try:
    yield
  finally:
    _DISCOVERY_FRAME.reset(frame)
    _OWN_GRADIENTS.reset(own)
    _IN_RELATIVE_PASS.reset(in_pass)


class FlowDense(DenseMethods, nn.Module):
  """One square dense layer y = z W + b of a flow (no activation), W unconstrained.

  Applied to z of shape (..., D) it maps every D-vector: on a (B, T, D) sequence it acts per
  position, on a (B, H, W, C) image it is an invertible 1×1 convolution (Glow). Each example
  then holds several D-vectors and its log-det holds log|det W| that many times; compute it
  with `forward_and_log_det(z, event_ndims)`, and the relative gradient picks up the weight
  from the loss automatically.

  Contract for layers built around it (what keeps the relative gradient exact): the sown
  pre-activation is exactly z @ kernel + bias with this layer's own `kernel` and `bias`
  params. Context-dependent shifts or scales go *after* the layer, in another module (as in
  `ConditionalFlowMLP`), never into its y. `value_and_relative_grad` refuses a flow layer
  whose params hold anything but `kernel` and `bias`. A loss that also reads them directly
  (a penalty on W, a weight tied to another module) gets those terms' relative gradient
  too, at O(D³) per step for each such layer.

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
    kernel = self.param(
      "kernel", lambda key: init_kernel(self.kernel_init, key, width, self.param_dtype)
    )
    bias = self.param("bias", self.bias_init, (width,), self.param_dtype) if self.use_bias else None
    if _IN_RELATIVE_PASS.get() and not self.is_initializing():
      self._refuse_unrecordable_use(kernel)
      kernel, bias = self._relative_pass_params(kernel, bias)
    y = z @ kernel
    if bias is not None:
      y = y + bias
    return self._track_preactivation(y)

  def _refuse_unrecordable_use(self, kernel: jax.Array) -> None:
    """Refuses, in the relative-gradient pass, an application whose update would be wrong:
    in a scope the pass did not make (a nested `model.apply` or `model.bind` inside the
    loss) or one that does not carry both of its collections (a lifted transform without
    them), under differentiation (`nn.grad`, `nn.vjp`, `nn.jvp`, `jax.grad`: the layer's y
    would not be the loss's only use of W), or under `nn.map_variables` that changes its
    kernel (the update is for the params as stored). The discovery pass, which runs first
    on the same loss, makes the checks that walk the call stack."""
    name = "/".join(self.path)
    discovery_frame = _DISCOVERY_FRAME.get()
    carried = self.is_mutable_collection(INTERMEDIATES) and (
      self.is_mutable_collection(PERTURBATIONS) == (discovery_frame is not None)
    )
    if not carried:
      raise ValueError(
        (NOT_CARRIED if _under_lifted_transform() else NESTED_APPLY).format(name=name)
      )
    if discovery_frame is None:
      return
    applies = 0
    for source, frame in enclosing_sources(discovery_frame):
      if differentiates(source, frame):
        raise ValueError(DIFFERENTIATED.format(name=name))
      if source.endswith(_LIFT_SOURCE) and _maps_kernel(frame, kernel):
        raise ValueError(MAPPED_PARAMS.format(name=name))
      applies += _is_module_apply(source, frame)
    if applies > 1:
      raise ValueError(NESTED_APPLY.format(name=name))

  def _relative_pass_params(
    self, kernel: jax.Array, bias: jax.Array | None
  ) -> tuple[jax.Array, jax.Array | None]:
    """W and b as the pass uses them (`relative_pass_params`), with the stand-ins of
    `perturbations` under `own_gradients` (made in the shape-only discovery pass)."""
    params = {"kernel": kernel} if bias is None else {"kernel": kernel, "bias": bias}
    if _OWN_GRADIENTS.get() and self.is_mutable_collection(PERTURBATIONS):
      for name, value in params.items():
        self.put_variable(PERTURBATIONS, name, jnp.zeros_like(value))
    stand_ins: dict[str, jax.Array] = {
      name: self.get_variable(PERTURBATIONS, name)
      for name in params
      if _OWN_GRADIENTS.get() and self.has_variable(PERTURBATIONS, name)
    }
    return relative_pass_params(kernel, bias, stand_ins)

  def _track_preactivation(self, y: jax.Array) -> jax.Array:
    """Sows y and adds this call's perturbation (a no-op outside the relative-gradient pass)."""
    if self.is_initializing():
      return y
    call = len(self.get_variable(INTERMEDIATES, PREACTIVATION, ()))
    if not self.sow(INTERMEDIATES, PREACTIVATION, y) or not _IN_RELATIVE_PASS.get():
      return y
    if self.is_mutable_collection(PERTURBATIONS):  # the shape-only discovery pass
      known: tuple[jax.Array, ...] = self.get_variable(PERTURBATIONS, PREACTIVATION, ())
      self.put_variable(PERTURBATIONS, PREACTIVATION, known + (jnp.zeros_like(y),))
      return y
    if not self.has_variable(PERTURBATIONS, PREACTIVATION):
      return y
    perturbations: tuple[jax.Array, ...] = self.get_variable(PERTURBATIONS, PREACTIVATION)
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
    if not _IN_RELATIVE_PASS.get() or self.is_initializing():
      return kernel_log_abs_det(self.get_variable("params", "kernel"))
    if self.is_mutable_collection(PERTURBATIONS):
      value = kernel_log_abs_det(self.get_variable("params", "kernel"))
      self.put_variable(PERTURBATIONS, LOG_ABS_DET, jnp.zeros_like(value))
      return value
    if self.has_variable(PERTURBATIONS, LOG_ABS_DET):
      return self.get_variable(PERTURBATIONS, LOG_ABS_DET)
    return kernel_log_abs_det(self.get_variable("params", "kernel"))

  def _kernel_and_bias(self) -> tuple[jax.Array, jax.Array | None]:
    bias = self.get_variable("params", "bias") if self.use_bias else None
    return self.get_variable("params", "kernel"), bias

  def _refuse_inverse_in_relative_pass(self) -> None:
    if _IN_RELATIVE_PASS.get() and not self.is_initializing():
      raise ValueError(
        f"value_and_relative_grad: flow layer '{'/'.join(self.path)}': {INVERSE_IN_RELATIVE_PASS}"
      )


NESTED_APPLY = (
  "value_and_relative_grad: flow layer '{name}' is applied in a nested model.apply(...) or "
  "model.bind(...) inside the loss, where the pass cannot record its pre-activations. Call "
  "the bound module's methods in the loss instead (m.log_prob(x), m.flow(x)). For a frozen "
  "flow, compute its outputs outside the loss and pass them in, or, where its input depends "
  "on what trains (a fixed prior on an encoder's output), make it part of the model and "
  "freeze its params with optax.multi_transform(..., optax.set_to_zero())."
)

NOT_CARRIED = (
  "value_and_relative_grad: flow layer '{name}' is applied inside a lifted transform (nn.vmap, "
  "nn.scan, ...) that does not carry the relative-gradient collections: inside nn.vmap or "
  "nn.scan, list 'intermediates' and 'perturbations' in variable_axes with the same axis as "
  "'params' (0), e.g. variable_axes={{'params': 0, 'intermediates': 0, 'perturbations': 0}}."
)

DIFFERENTIATED = (
  "value_and_relative_grad: the loss differentiates through flow layer '{name}' (nn.grad, "
  "nn.vjp, nn.jvp, jax.grad, jax.jacfwd, ...: a score or gradient penalty). The relative "
  "gradient covers losses that use a layer through its outputs and log|det W| only: train "
  "this loss with jax.value_and_grad."
)

MAPPED_PARAMS = (
  "value_and_relative_grad: flow layer '{name}' is applied under nn.map_variables that maps "
  "its params (a frozen copy by stop_gradient, a reparameterisation), so the layer does not "
  "use its params as stored and their relative gradient would be wrong. Freeze a flow with "
  "optax (optax.multi_transform with optax.set_to_zero() for its params) or compute a frozen "
  "copy's outputs outside the loss; reparameterise outside the flow layers."
)

_LIFT_SOURCE = "flax/core/lift.py"


def _is_module_apply(source: str, frame: types.FrameType) -> bool:
  return source.endswith("flax/linen/module.py") and frame.f_code.co_name == "apply"


def _under_lifted_transform() -> bool:
  """Whether the innermost `Module.apply` or Flax lifted transform around the caller is the
  latter."""
  for source, frame in enclosing_sources(None):
    if source.endswith(_LIFT_SOURCE):
      return True
    if _is_module_apply(source, frame):
      return False
  return False


def _maps_kernel(frame: types.FrameType, kernel: jax.Array) -> bool:
  """Whether `frame` runs Flax's `lift.map_variables` with a map of the 'params' collection
  that changed `kernel` (the function that applies the map closes over `map_in_fn` and
  `mapped_collections`; its argument `variable_groups` holds the variables before the map,
  so an unchanged kernel is one of their leaves)."""
  if "map_in_fn" not in frame.f_code.co_freevars:
    return False
  mapped = frame.f_locals.get("mapped_collections")
  if frame.f_locals.get("map_in_fn") is flax.core.lift.id_fn or not (
    mapped is not None and flax.core.scope.in_filter(mapped, "params")
  ):
    return False
  before = frame.f_locals.get("variable_groups", ((),))[0]
  return not any(leaf is kernel for leaf in jax.tree_util.tree_leaves(before))


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


class LinenFlowHooks(FlowMethods):
  """The core's hooks for a Linen flow with `layers`, `activation`, `splines` and an
  optional `base_distribution` made in `setup` (shared by `FlowMLP` and `ConditionalFlowMLP`)."""

  layers: Sequence[FlowDense]
  base: str
  base_distribution: DiagonalGaussian

  def _width(self) -> int | None:
    """D, from the first kernel; None while initializing."""
    if not self.layers[0].has_variable("params", "kernel"):
      return None
    return self.layers[0].get_variable("params", "kernel").shape[-1]

  def _latent_dtype(self) -> Dtype:
    return self.layers[0].get_variable("params", "kernel").dtype

  def _base_params(self, width: int) -> GaussianParams:
    return self.base_distribution(width) if self.base == "diagonal_gaussian" else None


def make_layers(
  num_layers: int, use_bias: bool, kernel_init: Initializer, param_dtype: Dtype
) -> list[FlowDense]:
  return [
    FlowDense(use_bias=use_bias, kernel_init=kernel_init, param_dtype=param_dtype)
    for _ in range(num_layers)
  ]


class FlowMLP(LinenFlowHooks, Flow, nn.Module):
  """A dense normalizing flow: `num_layers` square layers with activations in between.

  Data → latent is the forward direction. The width D is taken from the input; all kernels
  are D×D and unconstrained (no triangular or LU structure). Every method maps the last axis
  and keeps any leading batch shape; inputs must be non-empty and have the kernels' D.

  Distribution methods (flowjax/distrax naming): `log_prob(x)`, `sample(rng, sample_shape)`,
  `sample_and_log_prob(rng, sample_shape)`, and the bijection's `forward_and_log_det(x)`
  (data → latent) and `inverse_and_log_det(z)` (latent → data); `forward_and_layer_terms(x)`
  gives each layer's share of the log-det. Sampling is differentiable (implicit
  differentiation of the activation's Newton inverse, autodiff through the solves).

  Attributes:
    num_layers: number of dense layers L ≥ 1.
    activation: strictly increasing activation between layers (see `Activation`).
    use_bias: whether the layers have biases.
    kernel_init: kernel initializer (orthogonal by default; see `near_identity`).
    param_dtype: dtype of the parameters (bfloat16 works: factorisations run in float32).
    base: the base density, "normal" (N(0, I), no params) or "diagonal_gaussian" (params
      `base_distribution/loc` and `base_distribution/log_scale`, see `BASES`).
    spline_bins: K > 0 puts a learned elementwise `RationalQuadraticSpline` with K bins
      before every dense layer (params `splines_k`, identity at init; O(D·K) per example;
      where: `spline_placement`); 0 (default): none.
    spline_bound: the splines' interval [−B, B] (identity outside it); it should cover the
      bulk of each layer's input (e.g. ±14 for MNIST in logit space).
    spline_placement: "every_layer" (default), or "input": one spline (`splines_0`), on the
      input x only (see `SPLINE_PLACEMENTS`); ignored when `spline_bins=0`.
  """

  num_layers: int = 2
  activation: Activation = SmoothLeakyReLU()
  use_bias: bool = True
  kernel_init: Initializer = nn.initializers.orthogonal()
  param_dtype: Dtype = jnp.float32
  base: str = "normal"
  spline_bins: int = 0
  spline_bound: float = 4.0
  spline_placement: str = "every_layer"

  def setup(self):
    check_flow_settings(
      self.num_layers,
      self.base,
      self.spline_bins,
      self.spline_placement,
      activation=self.activation,
    )
    self.layers = make_layers(self.num_layers, self.use_bias, self.kernel_init, self.param_dtype)
    self.splines = (
      [
        RationalQuadraticSpline(self.spline_bins, self.spline_bound, self.param_dtype)
        for _ in range(spline_count(self.num_layers, self.spline_bins, self.spline_placement))
      ]
      if self.spline_bins
      else None
    )
    if self.base == "diagonal_gaussian":
      self.base_distribution = DiagonalGaussian(self.param_dtype)
