"""Native Flax NNX flows and their relative gradient: `import flax_relgrad.nnx as frn`.

The NNX binding of the framework-free core (`flax_relgrad.core`): the same maths and methods
as the Linen modules (row-vector convention, y = z W + b; see `flax_relgrad.flow`), as
`nnx.Module`s that own their parameters: `FlowDense(width, rngs=...)`,
`FlowMLP(width, num_layers, ..., rngs=...)`, `ConditionalFlowMLP(width, context_features,
num_layers, ..., rngs=...)`. A training step in the idiom of the Flax NNX
examples::

    model = frn.FlowMLP(16, num_layers=2, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, x):
      loss, grads = frn.value_and_relative_grad(lambda m, x: -m.log_prob(x).mean())(model, x)
      optimizer.update(model, grads)
      return loss

How the relative gradient is obtained. `value_and_relative_grad` differentiates the loss
with respect to the model's `nnx.Param`s and to zero perturbations of every flow layer's
pre-activation y (δ = ∂loss/∂y) and of its log|det W| (λ = ∂loss/∂log|det W|). The
perturbations, and the recorded y, live only for the duration of that call, as temporary
state of each `FlowDense` (`_RelativePassState`) removed when the call ends: nothing stays in
the module, so no state can go stale between calls or collide with what the model sows, and
every call builds them for its own batch (any batch size, jit-compatible). Being module
state, they follow the layers through `nnx.vmap`: flows stacked on axis 0 (kernels
(E, D, D)) each get their own exact update. The
per-layer maths is `flax_relgrad.relative`, shared with the Linen API.

This module is not imported by `import flax_relgrad`: `flax.nnx` adds about 0.3 s to the
import, which a Linen user need not pay. Import it as `flax_relgrad.nnx`.
"""

from __future__ import annotations

import flax

if tuple(int(part) for part in flax.__version__.split(".")[:2]) < (0, 12):
  raise ImportError(
    f"flax_relgrad.nnx needs flax >= 0.12 (Flax NNX's current API), found flax {flax.__version__}."
  )

from collections.abc import Callable
from collections.abc import Iterator
from collections.abc import Sequence
import contextlib  # noqa: E402
import contextvars
import sys
import types
from typing import Any

from flax import nnx
import flax.traverse_util
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
from flax_relgrad.core.dense import factorisation_dtype
from flax_relgrad.core.dense import init_kernel
from flax_relgrad.core.dense import kernel_log_abs_det
from flax_relgrad.core.dense import relative_pass_params
from flax_relgrad.core.distribution import ConditionalFlow
from flax_relgrad.core.distribution import Flow
from flax_relgrad.core.distribution import FlowMethods
from flax_relgrad.core.distribution import check_context
from flax_relgrad.core.distribution import check_head_features
from flax_relgrad.core.distribution import split_modulations
from flax_relgrad.core.splines import Knots
from flax_relgrad.core.splines import SplineMethods
from flax_relgrad.core.splines import check_spline_settings
from flax_relgrad.core.splines import spline_knots
from flax_relgrad.core.stack import GaussianParams
from flax_relgrad.core.stack import Modulation
from flax_relgrad.core.stack import check_flow_settings
from flax_relgrad.core.stack import spline_count
from flax_relgrad.relative import PyTree
from flax_relgrad.relative import RelativeArgs
from flax_relgrad.relative import add_own_gradients
from flax_relgrad.relative import check_scalar_loss
from flax_relgrad.relative import differentiates
from flax_relgrad.relative import enclosing_sources
from flax_relgrad.relative import make_placeholders
from flax_relgrad.relative import refuse_differentiation_of_flow_params
from flax_relgrad.relative import relative_gradients

Path = tuple[Any, ...]

__all__ = [
  "ConditionalFlowMLP",
  "DiagonalGaussian",
  "FlowDense",
  "FlowMLP",
  "ModulationHead",
  "RationalQuadraticSpline",
  "value_and_relative_grad",
  "value_grad_and_relative_args",
]

ORTHOGONAL = nnx.initializers.orthogonal()
"""The default kernel initializer (as in the Linen modules)."""

DEFAULT_ACTIVATION = SmoothLeakyReLU()
"""The default activation, SmoothLeakyReLU(alpha=0.01)."""


class _RelativePassState(nnx.Variable):
  """A FlowDense's state during one relative-gradient pass (its perturbations and recorded
  pre-activations), removed when the pass ends. As module state it follows the layer through
  `nnx.vmap`: layers stacked on axis 0 see their own slice, and what they record comes back
  stacked."""


_PATH = "_relative_path"  # Static attribute: the layer's path in the model passed.
_PERTURBATIONS = "_relative_perturbations"  # (zero y-shaped perturbation per call,)
_LOG_ABS_DET = "_relative_log_abs_det"  # The log|det W| placeholder, shape: the stack's.
_PREACTIVATIONS = "_relative_preactivations"  # (y per call,), written by the layer.
_STAND_INS = {"kernel": "_relative_kernel", "bias": "_relative_bias"}  # Zeros added to W, b.


class _RelativePass:
  """What the flow layers read and record during one `value_and_relative_grad` call.

  Every FlowDense of the model gets its path as a static attribute and, in the gradient
  pass, its perturbations as `_RelativePassState` (shapes with the stack's leading axes for
  layers stacked by `nnx.vmap`), all removed on exit.

  Attributes:
    layers: {path: FlowDense} of the model.
    perturbations: {path: {PREACTIVATION: (zeros per call), LOG_ABS_DET: placeholder}}, or
      None in the shape-only discovery pass.
    calls: {path: the number of times the layer was applied so far in this pass}.
    shapes: {path: [ShapeDtypeStruct of y per call]}, the stack's axes in front (discovery).
    log_det_layers: paths of the layers whose log|det W| the loss used.
    stack_shapes: {path: the leading axes of the layer's kernel, () unless stacked}.
  """

  def __init__(self, model: nnx.Module, perturbations: dict[Path, dict[str, Any]] | None):
    self.layers = {path: m for path, m in nnx.iter_modules(model) if isinstance(m, FlowDense)}
    self.perturbations = perturbations
    self.calls: dict[Path, int] = {}
    self.shapes: dict[Path, list[jax.ShapeDtypeStruct]] = {}
    self.log_det_layers: set[Path] = set()
    self.stack_shapes = {path: layer.kernel.shape[:-2] for path, layer in self.layers.items()}
    self.unwritten: dict[Path, tuple[jax.Array, ...]] = {}
    self.loss_frame: types.FrameType | None = None

  def attach(self) -> None:
    for path, layer in self.layers.items():
      setattr(layer, _PATH, path)
      layer_perturbations = (self.perturbations or {}).get(path, {})
      if PREACTIVATION in layer_perturbations:
        calls = tuple(layer_perturbations[PREACTIVATION])
        setattr(layer, _PERTURBATIONS, _RelativePassState(calls))
        setattr(layer, _PREACTIVATIONS, _RelativePassState(calls))
        self.unwritten[path] = calls
      if LOG_ABS_DET in layer_perturbations:
        setattr(layer, _LOG_ABS_DET, _RelativePassState(layer_perturbations[LOG_ABS_DET]))
      for param, name in _STAND_INS.items():
        if param in layer_perturbations:
          setattr(layer, name, _RelativePassState(layer_perturbations[param]))

  def detach(self) -> None:
    for layer in self.layers.values():
      for name in (_PATH, _PERTURBATIONS, _PREACTIVATIONS, _LOG_ABS_DET, *_STAND_INS.values()):
        if hasattr(layer, name):
          delattr(layer, name)

  def recorded_preactivations(self) -> dict[Path, tuple[jax.Array, ...]]:
    """{path: (y per call,)} as the model holds them (a stack's axes in front), refusing a
    call whose y never came back to the model (still its placeholder)."""
    recorded = {
      path: getattr(layer, _PREACTIVATIONS).get_value()
      for path, layer in self.layers.items()
      if hasattr(layer, _PREACTIVATIONS)
    }
    for path, ys in recorded.items():
      for call, (y, placeholder) in enumerate(zip(ys, self.unwritten[path], strict=True)):
        if y is placeholder:
          raise ValueError(NOT_RECORDED.format(name=_name(path), call=call + 1))
    return recorded

  def path(self, layer: FlowDense) -> Path:
    path = getattr(layer, _PATH, None)
    if path is None:
      raise ValueError(
        "flax_relgrad.nnx.value_and_relative_grad: the loss applies a FlowDense that is not "
        "an attribute of the model passed (created in the loss, or captured from outside)."
      )
    return path

  def preactivation(self, layer: FlowDense, y: jax.Array) -> jax.Array:
    path = self.path(layer)
    call = self.calls.get(path, 0)
    self.calls[path] = call + 1
    if self.perturbations is None:
      outer_kernel = self.stack_shapes[path] + layer.kernel.shape[-2:]
      if layer.kernel.shape != (y.shape[-1],) * 2 or self.layers[path].kernel.shape != outer_kernel:
        raise ValueError(
          f"FlowDense '{_name(path)}' is stacked by nnx.vmap on another axis than 0 (its kernel "
          f"is {self.layers[path].kernel.shape} in the model, {layer.kernel.shape} where it is "
          "applied): stack flows on axis 0 (in_axes=0 and out_axes=0 for the module)."
        )
      self._refuse_enclosing_transform(path)
      shape = self.stack_shapes[path] + y.shape
      self.shapes.setdefault(path, []).append(jax.ShapeDtypeStruct(shape, y.dtype))
      return y
    perturbation = getattr(layer, _PERTURBATIONS).get_value()[call]
    if perturbation.shape != y.shape:
      raise ValueError(
        f"FlowDense '{_name(path)}' (call {call + 1}) maps y of shape {y.shape}, but its "
        f"relative-gradient perturbation has shape {perturbation.shape}. Either the loss is not "
        "a pure function of its args (it maps another shape than in the discovery pass), or "
        "the layer is stacked by nnx.vmap on another axis than 0: stack flows on axis 0 "
        "(in_axes=0 for the module, all of its state)."
      )
    recorded = getattr(layer, _PREACTIVATIONS)
    recorded.set_value(recorded.get_value()[:call] + (y,) + recorded.get_value()[call + 1 :])
    return y + perturbation

  def _refuse_enclosing_transform(self, path: Path) -> None:
    """Refuses a layer applied, inside the loss, under a JAX loop that shares it across steps
    or under differentiation: JAX traces both through Python, so their functions are on the
    call stack between the loss and this layer (`enclosing_sources`). A stacked layer
    (kernel (E, D, D)) may be scanned over its stack axis: each step applies its own layer."""
    for source, frame in enclosing_sources(self.loss_frame):
      if source.endswith(_LOOP_SOURCE) and not self.stack_shapes[path]:
        raise ValueError(SHARED_IN_LOOP.format(name=_name(path)))
      if differentiates(source, frame):
        raise ValueError(DIFFERENTIATED.format(name=_name(path)))

  def layer_params(
    self, layer: FlowDense, kernel: jax.Array, bias: jax.Array | None
  ) -> tuple[jax.Array, jax.Array | None]:
    """W and b as the pass uses them (`relative_pass_params`), with the layer's stand-ins
    when the pass attached them (`value_grad_and_relative_args`)."""
    stand_ins = {
      param: getattr(layer, name).get_value()
      for param, name in _STAND_INS.items()
      if hasattr(layer, name)
    }
    return relative_pass_params(kernel, bias, stand_ins)

  def log_abs_det(self, layer: FlowDense) -> jax.Array:
    path = self.path(layer)
    self.log_det_layers.add(path)
    if self.perturbations is None:
      return jnp.zeros((), factorisation_dtype(layer.kernel.dtype))
    return getattr(layer, _LOG_ABS_DET).get_value()


_ACTIVE: contextvars.ContextVar[_RelativePass | None] = contextvars.ContextVar(
  "relative_pass", default=None
)


@contextlib.contextmanager
def _relative_pass(
  model: nnx.Module, perturbations: dict[Path, dict[str, Any]] | None
) -> Iterator[_RelativePass]:
  tracker = _RelativePass(model, perturbations)
  tracker.attach()
  token = _ACTIVE.set(tracker)
  try:
    yield tracker
  finally:
    _ACTIVE.reset(token)
    tracker.detach()


def _name(path: Path) -> str:
  return "/".join(map(str, path))


class FlowDense(DenseMethods, nnx.Module):
  """One square dense layer y = z W + b of a flow (no activation), W unconstrained (NNX).

  Maps the last axis of z (..., D): per position on a (B, T, D) sequence, an invertible 1×1
  convolution on (B, H, W, C) images (`forward_and_log_det(z, event_ndims)`). Same contract
  as the Linen `flax_relgrad.FlowDense`: y = z W + b with its own `kernel` and `bias`; put
  context-dependent shifts or scales after the layer. A loss may also read `kernel` and `bias`
  directly (a penalty, a tied weight: read the layer's `kernel[...]` rather than sharing its
  `nnx.Param` with another module).

  Args:
    width: D.
    use_bias: whether to add the bias b.
    kernel_init: initializer of the (D, D) kernel W (run in at least float32, then cast).
    bias_init: initializer of the (D,) bias b.
    param_dtype: dtype of the parameters.
    rngs: the `nnx.Rngs` that draw the initial kernel.
  """

  def __init__(
    self,
    width: int,
    *,
    use_bias: bool = True,
    kernel_init: Initializer = ORTHOGONAL,
    bias_init: Initializer = nnx.initializers.zeros,
    param_dtype: Dtype = jnp.float32,
    rngs: nnx.Rngs,
  ):
    self.kernel = nnx.Param(init_kernel(kernel_init, rngs.params(), width, param_dtype))
    self.bias = nnx.Param(bias_init(rngs.params(), (width,), param_dtype)) if use_bias else None

  def __call__(self, z: jax.Array) -> jax.Array:
    """Maps z (..., D) to y = z W + b (..., D)."""
    kernel, bias = self._kernel_and_bias()
    tracker = _ACTIVE.get()
    if tracker is not None:
      kernel, bias = tracker.layer_params(self, kernel, bias)
    y = z @ kernel
    if bias is not None:
      y = y + bias
    return y if tracker is None else tracker.preactivation(self, y)

  def log_abs_det(self) -> jax.Array:
    """log|det W| (a scalar) by `slogdet`, O(D³); in the relative-gradient pass, the
    placeholder whose gradient is λ (no slogdet)."""
    tracker = _ACTIVE.get()
    return kernel_log_abs_det(self.kernel[...]) if tracker is None else tracker.log_abs_det(self)

  def _kernel_and_bias(self) -> tuple[jax.Array, jax.Array | None]:
    return self.kernel[...], None if self.bias is None else self.bias[...]

  def _refuse_inverse_in_relative_pass(self) -> None:
    if _ACTIVE.get() is not None:
      raise ValueError(f"flax_relgrad.nnx.value_and_relative_grad: {INVERSE_IN_RELATIVE_PASS}")


class DiagonalGaussian(nnx.Module):
  """The learned base N(loc, diag(exp(2·log_scale))), `loc` and `log_scale` (D,) from 0."""

  def __init__(self, width: int, *, param_dtype: Dtype = jnp.float32):
    self.loc = nnx.Param(jnp.zeros((width,), param_dtype))
    self.log_scale = nnx.Param(jnp.zeros((width,), param_dtype))

  def __call__(self) -> tuple[jax.Array, jax.Array]:
    """(loc, log_scale), each (D,)."""
    return self.loc[...], self.log_scale[...]


class RationalQuadraticSpline(SplineMethods, nnx.Module):
  """A learned monotone rational-quadratic spline on every coordinate, identity outside
  [−bound, bound] (NNX binding of `flax_relgrad.core.splines`; identity at init).

  Args:
    width: D.
    num_bins: K, spline segments per coordinate.
    bound: B > 0.
    param_dtype: dtype of the parameters `widths`, `heights` (D, K), `derivatives` (D, K − 1).
  """

  def __init__(
    self, width: int, num_bins: int = 8, bound: float = 4.0, *, param_dtype: Dtype = jnp.float32
  ):
    check_spline_settings(num_bins, bound)
    if width < 1:
      raise ValueError(f"A spline needs width D >= 1, got {width}.")
    self.bound = bound
    self.widths = nnx.Param(jnp.zeros((width, num_bins), param_dtype))
    self.heights = nnx.Param(jnp.zeros((width, num_bins), param_dtype))
    self.derivatives = nnx.Param(jnp.zeros((width, num_bins - 1), param_dtype))

  def knots(self, width: int | None = None) -> Knots:
    """Knot positions x, y and derivatives, each (D, K + 1); `width`: the inputs' D, which
    must be this spline's."""
    own_width = self.widths[...].shape[0]
    if width is not None and width != own_width:
      raise ValueError(
        f"The spline has D = {own_width} coordinates but got inputs of width {width}."
      )
    return spline_knots(self.widths[...], self.heights[...], self.derivatives[...], self.bound)


class _NNXFlowHooks(FlowMethods):
  """The core's hooks for an NNX flow (`FlowMLP`, `ConditionalFlowMLP`)."""

  width: int
  layers: Sequence[FlowDense]
  base_distribution: DiagonalGaussian | None

  def _width(self) -> int | None:
    return self.width

  def _latent_dtype(self) -> Dtype:
    return self.layers[0].kernel.dtype

  def _base_params(self, width: int) -> GaussianParams:
    return None if self.base_distribution is None else self.base_distribution()

  def _build(
    self,
    width: int,
    num_layers: int,
    activation: Activation,
    use_bias: bool,
    kernel_init: Initializer,
    param_dtype: Dtype,
    base: str,
    *,
    spline_bins: int = 0,
    spline_bound: float = 4.0,
    spline_placement: str = "every_layer",
    rngs: nnx.Rngs,
  ) -> None:
    check_flow_settings(num_layers, base, spline_bins, spline_placement, activation=activation)
    self.width = width
    self.activation = activation
    self.layers = nnx.List(
      [
        FlowDense(
          width, use_bias=use_bias, kernel_init=kernel_init, param_dtype=param_dtype, rngs=rngs
        )
        for _ in range(num_layers)
      ]
    )
    self.splines = (
      nnx.List(
        [
          RationalQuadraticSpline(width, spline_bins, spline_bound, param_dtype=param_dtype)
          for _ in range(spline_count(num_layers, spline_bins, spline_placement))
        ]
      )
      if spline_bins
      else None
    )
    self.base_distribution = (
      DiagonalGaussian(width, param_dtype=param_dtype) if base == "diagonal_gaussian" else None
    )


class FlowMLP(_NNXFlowHooks, Flow, nnx.Module):
  """A dense normalizing flow (NNX): `num_layers` square D×D layers, activations in between.

  The NNX binding of `flax_relgrad.FlowMLP`, with the same methods and maths. Data → latent is
  the forward direction; every method maps the last axis (D) and keeps any leading batch
  shape; inputs must be non-empty with D = `width`.

  Args:
    width: D.
    num_layers: number of dense layers L ≥ 1.
    activation: strictly increasing activation between layers (see `Activation`).
    use_bias: whether the layers have biases.
    kernel_init: kernel initializer (orthogonal by default; see `near_identity`).
    param_dtype: dtype of the parameters.
    base: "normal" (N(0, I)) or "diagonal_gaussian" (learned `base_distribution.loc` and
      `.log_scale`, ordinary params next to the flow layers).
    spline_bins: K > 0 puts a learned `RationalQuadraticSpline` with K bins before every
      dense layer (`splines[k]`, identity at init; where: `spline_placement`); 0 (default):
      none.
    spline_bound: the splines' interval [−B, B] (identity outside it).
    spline_placement: "every_layer" (default), or "input": one spline (`splines[0]`), on the
      input x only; ignored when `spline_bins=0`.
    rngs: the `nnx.Rngs` that draw the initial kernels.
  """

  def __init__(
    self,
    width: int,
    num_layers: int = 2,
    *,
    activation: Activation = DEFAULT_ACTIVATION,
    use_bias: bool = True,
    kernel_init: Initializer = ORTHOGONAL,
    param_dtype: Dtype = jnp.float32,
    base: str = "normal",
    spline_bins: int = 0,
    spline_bound: float = 4.0,
    spline_placement: str = "every_layer",
    rngs: nnx.Rngs,
  ):
    self._build(
      width,
      num_layers,
      activation,
      use_bias,
      kernel_init,
      param_dtype,
      base,
      spline_bins=spline_bins,
      spline_bound=spline_bound,
      spline_placement=spline_placement,
      rngs=rngs,
    )


class ModulationHead(nnx.Module):
  """Linear map from context features h (..., H) to every layer's (shift, log_scale) (..., D),
  zero at init (NNX binding of `flax_relgrad.ModulationHead`).

  Args:
    features: H.
    width: D.
    num_layers: L.
    scale: whether to produce log-scales (otherwise they are 0: shifts only).
    param_dtype: dtype of the parameters.
    rngs: the `nnx.Rngs` of the linear map.
  """

  def __init__(
    self,
    features: int,
    width: int,
    num_layers: int,
    *,
    scale: bool = True,
    param_dtype: Dtype = jnp.float32,
    rngs: nnx.Rngs,
  ):
    self.width, self.num_layers, self.scale = width, num_layers, scale
    outputs = num_layers * (2 if scale else 1) * width
    self.linear = nnx.Linear(
      features, outputs, kernel_init=nnx.initializers.zeros, param_dtype=param_dtype, rngs=rngs
    )

  def __call__(self, h: jax.Array) -> list[Modulation]:
    """Every layer's (shift, log_scale), each (..., D)."""
    check_head_features(h, self.linear.in_features)
    return split_modulations(self.linear(h), self.num_layers, self.scale, self.width)


class ConditionalFlowMLP(_NNXFlowHooks, ConditionalFlow, nnx.Module):
  """A dense flow for p(x | c) (NNX): `FlowMLP` with context-dependent shifts and scales after
  every dense layer (the NNX binding of `flax_relgrad.ConditionalFlowMLP`, same maths).

  Every method takes the context c (..., C) with the leading shape of x (..., D);
  `sample(rng, c, sample_shape)` draws sample_shape + c.shape[:-1] + (D,).

  Args:
    width: D.
    context_features: H, the width of what the head reads: the conditioner's output
      features, or C without a conditioner.
    num_layers: number of dense layers L ≥ 1.
    conditioner: an NNX module (or any callable) mapping c (..., C) to features (..., H),
      e.g. a small MLP; None uses c itself.
    activation, context_scale, use_bias, kernel_init, param_dtype, base: as in the Linen
      `flax_relgrad.ConditionalFlowMLP`.
    rngs: the `nnx.Rngs` that draw the initial kernels.
  """

  def __init__(
    self,
    width: int,
    context_features: int,
    num_layers: int = 2,
    *,
    conditioner: Callable[[jax.Array], jax.Array] | None = None,
    activation: Activation = DEFAULT_ACTIVATION,
    context_scale: bool = True,
    use_bias: bool = True,
    kernel_init: Initializer = ORTHOGONAL,
    param_dtype: Dtype = jnp.float32,
    base: str = "normal",
    rngs: nnx.Rngs,
  ):
    self._build(width, num_layers, activation, use_bias, kernel_init, param_dtype, base, rngs=rngs)
    self.conditioner = conditioner
    self.head = ModulationHead(
      context_features, width, num_layers, scale=context_scale, param_dtype=param_dtype, rngs=rngs
    )

  def _modulations(
    self, context: tuple[jax.Array, ...], leading_shape: tuple[int, ...], width: int
  ) -> Sequence[Modulation]:
    c = check_context(context, leading_shape, type(self).__name__)
    return self.head(c if self.conditioner is None else self.conditioner(c))


LossFn = Callable[..., Any]


def value_and_relative_grad(
  loss_fn: LossFn,
  *,
  has_aux: bool = False,
  exact_loss: bool = False,
  require_log_det: bool = True,
) -> Callable[..., tuple[Any, nnx.State]]:
  """Like `nnx.value_and_grad(loss_fn)`, for an NNX model that contains flow layers.

  `loss_fn(model, *args, **kwargs)` computes a scalar loss (or `(loss, aux)` with
  `has_aux=True`) from the model: any methods, flows anywhere in its tree next to ordinary
  layers (a learned base, an encoder, ...). The returned function::

      (model, *args, **kwargs) -> (value, grads)

  gives the loss and the gradients with respect to `nnx.Param` (an `nnx.State`, as
  `nnx.grad` returns, for `optimizer.update(model, grads)` with any optax optimizer), where
  every flow layer's kernel and bias hold their exact relative gradient (from the layer's
  pre-activations y, δ = ∂loss/∂y and λ = ∂loss/∂log|det W|, as in the Linen
  `flax_relgrad.value_and_relative_grad`) and every other leaf its ordinary gradient.

  - Unless `exact_loss`, every flow layer's log|det W| enters `value` as 0: it is not the NLL.
  - Other state the loss changes (`nnx.BatchNorm` statistics, `nnx.Rngs` counts) is written
    back to the model, as `nnx.value_and_grad` does.
  - The loss may apply flows under `nnx.jit`, `nnx.remat`, `nnx.cond`, `nnx.vmap` of flows
    stacked on axis 0 and `nnx.scan` over such a stack. A layer shared by the steps of a loop,
    a copy of the model whose state does not come back (`nnx.clone`), or differentiation
    through a flow inside the loss raises a `ValueError`: the update would be wrong. So does
    differentiating the results with respect to flow params (meta-learning through a step).

  Args:
    loss_fn: `loss_fn(model, *args, **kwargs)`.
    has_aux: whether `loss_fn` returns (loss, aux).
    exact_loss: compute each flow layer's log|det W| by `slogdet` (forward only, O(D³)), for
      losses that are not affine in the log-likelihoods (a mixture of flows), and to get
      the exact loss value.
    require_log_det: refuse a loss that applies a flow layer but never uses its log|det W|.

  Returns:
    The function `(model, *args, **kwargs) -> (value, grads)`.
  """

  value_grad_and_args = _relative_pass_fn(
    loss_fn, has_aux, exact_loss, require_log_det, own_gradients=False
  )

  def value_and_grad_fn(model: nnx.Module, *args: Any, **kwargs: Any) -> tuple[Any, nnx.State]:
    value, grads, relative_args = value_grad_and_args(model, *args, **kwargs)
    return value, relative_gradients(nnx.state(model, nnx.Param), grads, relative_args)

  return value_and_grad_fn


def value_grad_and_relative_args(
  loss_fn: LossFn,
  *,
  has_aux: bool = False,
  exact_loss: bool = False,
  require_log_det: bool = True,
) -> Callable[..., tuple[Any, nnx.State, RelativeArgs]]:
  """The pass of `value_and_relative_grad`, stopped before the rewrite: for
  `optax.chain(fr.relative_jacobian(), ...)` in an `nnx.Optimizer`.

  The returned function `(model, *args, **kwargs) -> (value, grads, relative_args)` gives the
  same value, the Euclidean gradient with every flow layer's log|det W| a placeholder (not for
  an optimizer on its own), and the `RelativeArgs` that complete it::

      loss, grads, relative_args = grad_fn(model, x)
      optimizer.update(model, grads, relative_args=relative_args)
  """
  return _relative_pass_fn(loss_fn, has_aux, exact_loss, require_log_det, own_gradients=True)


def _relative_pass_fn(
  loss_fn: LossFn,
  has_aux: bool,
  exact_loss: bool,
  require_log_det: bool,
  own_gradients: bool,
) -> Callable[..., tuple[Any, nnx.State, RelativeArgs]]:
  """The pass both public functions share. The flow layers' leaves of its autodiff gradient
  hold only the loss's other uses of their params; with `own_gradients`
  (`value_grad_and_relative_args`) it returns the whole Euclidean gradient and those other
  uses in `RelativeArgs.direct_grads`."""

  def value_grad_and_args_fn(
    model: nnx.Module, *args: Any, **kwargs: Any
  ) -> tuple[Any, nnx.State, RelativeArgs]:
    # Keyword arguments are closed over: jax.grad with argnums cannot place them.
    def loss_and_preactivations(model, perturbations, *args):
      with _relative_pass(model, _by_layer(perturbations)) as tracker:
        output = loss_fn(model, *args, **kwargs)
        recorded = tracker.recorded_preactivations()
      loss = output[0] if has_aux else output
      check_scalar_loss(loss)
      calls = {path + (PREACTIVATION,): ys for path, ys in recorded.items()}
      return loss, (output, flax.traverse_util.unflatten_dict(calls))

    try:
      discovered = _discover(model, loss_fn, args, kwargs, own_gradients)
      stored = nnx.state(model, nnx.Param)
      placeholders = make_placeholders(
        discovered, nnx.to_pure_dict(stored), exact_loss, require_log_det
      )
      # The pass reads the flow params behind the guard, which leaves their values as they
      # are; the model gets its own params back afterwards.
      nnx.update(model, refuse_differentiation_of_flow_params(stored, discovered))
      try:
        (_, (output, preactivations)), (grads, perturbation_grads) = nnx.value_and_grad(
          loss_and_preactivations, argnums=(0, 1), has_aux=True
        )(model, placeholders, *args)
      finally:
        nnx.update(model, stored)
    except flax.errors.TraceContextError as error:
      raise ValueError(RAW_TRANSFORM) from error
    except ValueError as error:
      if _PREACTIVATIONS not in str(error):
        raise
      raise ValueError(BROADCAST_UNDER_VMAP) from error
    direct_grads = None
    if own_gradients:
      grads, direct_grads, perturbation_grads = add_own_gradients(grads, perturbation_grads)
    return output, grads, RelativeArgs(preactivations, perturbation_grads, direct_grads)

  return value_grad_and_args_fn


RAW_TRANSFORM = (
  "flax_relgrad.nnx.value_and_relative_grad: the loss applies a flow layer inside a raw JAX "
  "transform (jax.vmap, jax.checkpoint, jax.lax.map or scan, or jax.grad/jacfwd through the "
  "flow), where the layer cannot record its pre-activations. Apply the flow to the whole "
  "(..., D) batch at once (it maps the last axis of any input), use nnx.vmap or nnx.remat, "
  "and train losses that differentiate through the flow (score or gradient penalties) with "
  "nnx.value_and_grad."
)

SHARED_IN_LOOP = (
  "flax_relgrad.nnx.value_and_relative_grad: FlowDense '{name}' is applied inside a loop "
  "(nnx.scan, nnx.fori_loop, nnx.while_loop or their jax.lax forms) that shares the layer "
  "across its steps, where its pre-activations differ per step but its relative-gradient "
  "state cannot. Apply the flow to all steps at once (it maps the last axis of any (..., D) "
  "input, e.g. x of shape (T, B, D)), unroll the loop in Python, or scan over a stack of "
  "layers (in_axes=0 for the module)."
)

DIFFERENTIATED = (
  "flax_relgrad.nnx.value_and_relative_grad: the loss differentiates through FlowDense "
  "'{name}' (nnx.grad, jax.grad, jax.jvp, jax.jacfwd, ...: a score or gradient penalty). The "
  "relative gradient covers losses that use a layer through its outputs and log|det W| only: "
  "train this loss with nnx.value_and_grad."
)

_LOOP_SOURCE = "jax/_src/lax/control_flow/loops.py"
"""Where JAX traces the body of lax.scan, fori_loop and while_loop (and NNX's loops)."""

NOT_RECORDED = (
  "flax_relgrad.nnx.value_and_relative_grad: FlowDense '{name}' (call {call}) was applied to a "
  "copy of the model whose state does not come back to it (nnx.clone, nnx.merge of nnx.split "
  "state inside jax.vmap or jax.lax.scan, nnx.scan with the flow broadcast), so its "
  "pre-activations were not recorded. Apply the model passed to the loss, under NNX "
  "transforms (nnx.vmap with in_axes=0 for stacked flows, nnx.remat, nnx.jit, nnx.cond), or "
  "apply the flow to all the inputs at once."
)

BROADCAST_UNDER_VMAP = (
  "flax_relgrad.nnx.value_and_relative_grad: a flow layer is applied inside nnx.vmap with its "
  "state broadcast (in_axes=None for the module), where its pre-activations differ per index "
  "but its state cannot. Apply the flow outside the vmap (on all the vectors at once: it maps "
  "the last axis of any (..., D) input), or stack one flow per index (in_axes=0)."
)


def _discover(
  model: nnx.Module, loss_fn: LossFn, args: tuple, kwargs: dict, own_gradients: bool
) -> PyTree:
  """A shape-only pass (free under jit, no effect on the model's state): the shapes of every
  flow layer's pre-activations, one per call, a log-det entry for each layer whose
  log|det W| the loss uses, and with `own_gradients` the kernel and bias stand-ins of each
  applied layer, as `{path: {PREACTIVATION: (...), LOG_ABS_DET: (), "kernel": ...}}`."""
  graphdef, state = nnx.split(model)
  found: dict[str, Any] = {}

  def shapes(state):
    model = nnx.merge(graphdef, state)
    with _relative_pass(model, None) as tracker:
      tracker.loss_frame = sys._getframe()
      loss_fn(model, *args, **kwargs)
    found["tracker"] = tracker

  jax.eval_shape(shapes, state)
  tracker = found["tracker"]
  flat: dict[Path, Any] = {
    path + (PREACTIVATION,): tuple(ys) for path, ys in tracker.shapes.items()
  }
  for path in tracker.log_det_layers:
    flat[path + (LOG_ABS_DET,)] = jax.ShapeDtypeStruct(tracker.stack_shapes[path], jnp.float32)
  if own_gradients:
    for path in tracker.shapes:
      layer = tracker.layers[path]
      kernel, bias = layer.kernel, layer.bias
      for name, param in (("kernel", kernel), ("bias", bias)):
        if param is not None:
          flat[path + (name,)] = jax.ShapeDtypeStruct(param.shape, param.dtype)
  return flax.traverse_util.unflatten_dict(flat)


def _by_layer(tree: PyTree) -> dict[Path, dict[str, Any]]:
  """{layer path: {PREACTIVATION: ..., LOG_ABS_DET: ...}} from the nested perturbations tree."""
  layers: dict[Path, dict[str, Any]] = {}
  for path, value in flax.traverse_util.flatten_dict(tree).items():
    layers.setdefault(path[:-1], {})[path[-1]] = value
  return layers
