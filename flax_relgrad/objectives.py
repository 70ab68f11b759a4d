"""Losses and gradients for maximum-likelihood training of models that contain flow layers.

- :func:`value_and_relative_grad` (fast, O(B·D²) per flow layer): `jax.value_and_grad` for a
  loss written in terms of a Linen module, returning the exact relative gradient for every
  flow layer and the ordinary gradient for every other parameter. Any optax optimizer takes
  it from there.
- :func:`value_and_exact_grad` (naive, O(D³) per flow layer): autodiff through `slogdet`,
  the Euclidean gradient any flow library gives an unconstrained dense layer.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Iterator
from collections.abc import Sequence
import contextlib
import sys
from typing import Any

import flax.errors
import flax.linen as nn
import flax.traverse_util
import jax
import jax.numpy as jnp

from flax_relgrad.core.dense import PREACTIVATION
from flax_relgrad.flow import INTERMEDIATES
from flax_relgrad.flow import PERTURBATIONS
from flax_relgrad.flow import relative_pass
from flax_relgrad.relative import PyTree
from flax_relgrad.relative import RelativeArgs
from flax_relgrad.relative import add_own_gradients
from flax_relgrad.relative import check_scalar_loss
from flax_relgrad.relative import make_placeholders
from flax_relgrad.relative import refuse_differentiation_of_flow_params
from flax_relgrad.relative import relative_gradients

LossFn = Callable[..., Any]


def value_and_relative_grad(
  model: nn.Module,
  loss_fn: LossFn | str,
  *,
  has_aux: bool = False,
  exact_loss: bool = False,
  require_log_det: bool = True,
  mutable: Sequence[str] = (),
) -> Callable[..., tuple[Any, PyTree]]:
  """Like `jax.value_and_grad`, for a loss of a Linen module that contains flow layers.

  `loss_fn(module, *args, **kwargs)` computes the loss from the bound module (any methods,
  any number of flows, nested anywhere, beside ordinary layers), for example `fr.nll`
  (−mean `log_prob`) or `lambda m, x, c: -m.log_prob(x, c).mean()`; a method name works too.
  The returned function `(params, *args, rngs=None, model_state=None, **kwargs) ->
  (value, grads)` applies it as `model.apply({"params": params, **model_state}, *args,
  method=loss_fn, rngs=rngs, mutable=mutable, **kwargs)`, with

  - `value`: the loss, or `(loss, aux)` with `has_aux=True`; with `mutable`, `(that,
    new_model_state)`, the updated collections as `apply(..., mutable=...)` returns them
    (`BatchNorm`'s `batch_stats`). **Unless `exact_loss`, every flow layer's log|det W|
    enters the loss — and aux — as 0**: the loss is then not the NLL (evaluate `log_prob` in
    a plain `apply` when you report, or pass `exact_loss=True`);
  - `grads`: a tree like params. Every flow layer (a `FlowDense`, wherever it sits) gets its
    exact relative gradient, ΔW = Ŵ Ŵᵀ Ĝ restricted to W and b (Ŵ = [[W, 0], [b, 1]], Ĝ the
    Euclidean gradient of the full loss, every log|det W| term included; see
    `relative_layer_update`), computed in O(B·D²) from the layer's pre-activations y,
    δ = ∂loss/∂y and λ = ∂loss/∂log|det W|, however the loss weighs the log-det (batch mean
    or sum, T terms per sequence, H·W per image, masks). Every other leaf is the ordinary
    gradient. Hand `grads` to any optax optimizer; scaling, clipping, accumulating or
    averaging them across devices stays exact, because each flow leaf is linear in Ĝ.

  The bookkeeping is built from this call (a shape-only pass, free under jit), never from
  `init`, so any batch size works. `value_grad_and_relative_args` is the same pass for the
  Optax transform `relative_jacobian()`. Refused with a `ValueError`, because the update
  would be wrong: a loss that applies a flow in a nested `model.apply`/`model.bind`, under
  `nn.map_variables` of its params, or differentiates through it (`nn.grad`, `jax.grad`: a
  score penalty); and differentiating through the result with respect to flow params.

  Args:
    model: the Linen module (unbound).
    loss_fn: `loss_fn(module, *args, **kwargs)` returning a scalar (or (scalar, aux)), or the
      name of a method of `model` that does. It may also read a flow layer's params directly
      (an L2 or orthogonality penalty on W, a weight tied to another module): that part of
      Ĝ gets its Ŵ Ŵᵀ Ĝ term at O(D³) per step for each layer read, and only then.
    has_aux: whether `loss_fn` returns (loss, aux).
    exact_loss: compute each flow layer's log|det W| by `slogdet` (forward only, O(D³)), so
      that the returned loss is exact. Needed for exactness when the loss is not affine in
      the log-likelihoods with constant coefficients — a mixture of flows, a log-mean-exp, the
      cross-entropy of a generative classifier, learned weights or gates on log p, EM
      responsibilities computed from log p (even under stop_gradient): there the gradients
      depend on the log-det values. A batch mean or sum of log-likelihoods, constant weights
      and masks do not need it.
    require_log_det: refuse a loss that applies a flow layer but never uses its
      log|det W| (a likelihood without it is wrong); pass False for a loss that truly does
      not contain it.
    mutable: the collections the loss updates (e.g. `["batch_stats"]` for `nn.BatchNorm` in
      training mode); their values go in as `model_state` and come back in `value`.

  Returns:
    The function `(params, *args, rngs=None, model_state=None, **kwargs) -> (value, grads)`.
  """
  value_grad_and_args = _relative_pass_fn(
    model, loss_fn, has_aux, exact_loss, require_log_det, mutable, own_gradients=False
  )

  def value_and_grad_fn(params: PyTree, *args: Any, **kwargs: Any) -> tuple[Any, PyTree]:
    value, grads, relative_args = value_grad_and_args(params, *args, **kwargs)
    return value, relative_gradients(params, grads, relative_args)

  return value_and_grad_fn


def value_grad_and_relative_args(
  model: nn.Module,
  loss_fn: LossFn | str,
  *,
  has_aux: bool = False,
  exact_loss: bool = False,
  require_log_det: bool = True,
  mutable: Sequence[str] = (),
) -> Callable[..., tuple[Any, PyTree, RelativeArgs]]:
  """The pass of `value_and_relative_grad`, stopped before the rewrite: for the Optax
  transform `relative_jacobian()`.

  Same arguments. The returned function `(params, *args, rngs=None, model_state=None,
  **kwargs) -> (value, grads, relative_args)` gives the same `value`, the *Euclidean*
  gradient of the loss in which every flow layer's log|det W| is a placeholder (so its
  kernel's leaf lacks the λ W⁻ᵀ term: these grads are not for an optimizer on their own), and
  the `RelativeArgs` (every flow layer's y, δ and λ, its own Euclidean gradient and that of
  the loss's other uses of its W and b) that complete them. Hand both to
  `optax.chain(fr.relative_jacobian(), ...)`::

      loss, grads, relative_args = grad_fn(params, x)
      updates, opt_state = tx.update(grads, opt_state, params, relative_args=relative_args)

  For a flow layer shared by the T steps of `nn.scan`, the pass holds the layer's own
  gradient per step (T·D² temporary memory; `value_and_relative_grad` does not).
  """
  return _relative_pass_fn(
    model, loss_fn, has_aux, exact_loss, require_log_det, mutable, own_gradients=True
  )


def _relative_pass_fn(
  model: nn.Module,
  loss_fn: LossFn | str,
  has_aux: bool,
  exact_loss: bool,
  require_log_det: bool,
  mutable: Sequence[str],
  own_gradients: bool,
) -> Callable[..., tuple[Any, PyTree, RelativeArgs]]:
  """The pass both public functions share. The flow layers' leaves of its autodiff gradient
  hold only the loss's other uses of their params (`relative_pass`); with `own_gradients`
  (`value_grad_and_relative_args`) it returns the whole Euclidean gradient and those other
  uses in `RelativeArgs.direct_grads`."""

  def value_grad_and_args_fn(
    params: PyTree, *args: Any, rngs: Any = None, model_state: PyTree = None, **kwargs: Any
  ) -> tuple[Any, PyTree, RelativeArgs]:
    model_state = _check_model_state(model_state, mutable)

    def apply(params, perturbations, collections):
      variables = {"params": params, **model_state}
      if perturbations is not None:
        variables[PERTURBATIONS] = perturbations
      return model.apply(
        variables,
        *args,
        method=loss_fn,
        mutable=list(collections) + list(mutable),
        rngs=rngs,
        **kwargs,
      )

    def discover(params):
      with relative_pass(own_gradients, sys._getframe()):
        return apply(params, None, [INTERMEDIATES, PERTURBATIONS])[1].get(PERTURBATIONS, {})

    with _flax_errors_explained():
      discovered = jax.eval_shape(discover, params)
    placeholders = make_placeholders(discovered, params, exact_loss, require_log_det)
    params = refuse_differentiation_of_flow_params(params, discovered)

    def loss_and_state(params, perturbations):
      with relative_pass(own_gradients):
        output, state = apply(params, perturbations, [INTERMEDIATES])
      loss, _ = output if has_aux else (output, None)
      check_scalar_loss(loss)
      new_state = {name: state[name] for name in mutable if name in state}
      return loss, (output, new_state, _preactivations(state.get(INTERMEDIATES, {})))

    with _flax_errors_explained():
      (_, (output, new_state, preactivations)), (grads, perturbation_grads) = jax.value_and_grad(
        loss_and_state, argnums=(0, 1), has_aux=True
      )(params, placeholders)
      # A flow applied in a raw transform may sow a tracer of that (finished) transform
      # without an error; using it raises one here rather than in the rewrite.
      preactivations = jax.tree_util.tree_map(lambda p: p + jnp.zeros((), p.dtype), preactivations)
    value = (output, new_state) if mutable else output
    direct_grads = None
    if own_gradients:
      grads, direct_grads, perturbation_grads = add_own_gradients(grads, perturbation_grads)
    return value, grads, RelativeArgs(preactivations, perturbation_grads, direct_grads)

  return value_grad_and_args_fn


# What a flow applied inside a raw JAX transform raises (older Flax: JaxTransformError).
_LEAKED_TRACER = (jax.errors.UnexpectedTracerError, flax.errors.JaxTransformError)

RAW_TRANSFORM = (
  "value_and_relative_grad: a flow layer leaked a traced value out of a JAX transform: the loss "
  "applies it inside a raw jax.lax.scan, jax.vmap or jax.checkpoint, or a branch of nn.cond or "
  "nn.switch applies a flow it closes over, where Flax cannot record its pre-activations. Use "
  "Flax's lifted transforms in the module (nn.scan, nn.vmap, nn.remat) with "
  "variable_axes={'intermediates': 0, 'perturbations': 0} (and 'params': 0, or "
  "variable_broadcast='params' for one flow shared by every step), and pass a flow to nn.cond "
  "or nn.switch as their module argument."
)

LIFTED_AXES = (
  "value_and_relative_grad: applying the loss failed with an axis error; if it runs a flow "
  "layer inside nn.vmap or nn.scan, check their axes. "
  "The relative gradient needs 'intermediates' and 'perturbations' on axis 0, and 'params' on "
  "axis 0 (one flow per index) or broadcast (variable_broadcast='params', one flow shared), "
  "e.g. nn.vmap(..., variable_axes={'params': 0, 'intermediates': 0, 'perturbations': 0}). "
  "One flow layer applied both inside and outside nn.scan or nn.vmap, or in two of them of "
  "different lengths, cannot keep one record of its pre-activations: apply it to all the "
  "inputs in one place, or give each place its own flow"
)


@contextlib.contextmanager
def _flax_errors_explained() -> Iterator[None]:
  """Turns what Flax raises for a loss the passes cannot run (a collection not passed, a flow
  in a raw JAX transform, lifted transforms on the wrong axes) into errors that say what to
  do; both passes apply the loss inside it."""
  try:
    yield
  except flax.errors.ScopeCollectionNotFound as error:
    raise ValueError(
      f"value_and_relative_grad: the loss reads a variable collection that was not passed ({error}). "
      "Pass the model's other collections as model_state={'batch_stats': ...} (and "
      "mutable=['batch_stats'] if the loss updates them, as nn.BatchNorm does in training)."
    ) from error
  except _LEAKED_TRACER as error:
    raise ValueError(RAW_TRANSFORM) from error
  except (IndexError, ValueError) as error:
    if not _looks_like_lifted_axes(error):
      raise
    raise ValueError(f"{LIFTED_AXES} (the error: {type(error).__name__}: {error})") from error


def _looks_like_lifted_axes(error: Exception) -> bool:
  """Whether an error of a pass is what Flax's lifted transforms raise for a collection on
  the wrong axis, or for one layer's record stacked in several ways (the library's own checks
  raise neither of these)."""
  return (
    isinstance(error, IndexError)
    or "out of bounds" in str(error)
    or "different leading axis sizes" in str(error)
  )


def _check_model_state(model_state: PyTree, mutable: Sequence[str]) -> dict[str, Any]:
  """The other collections as a dict, refusing names the bookkeeping owns."""
  if isinstance(mutable, str):
    raise TypeError(
      f"mutable must be a sequence of collection names, e.g. [{mutable!r}], not a string."
    )
  model_state = dict(model_state or {})
  reserved = {"params", INTERMEDIATES, PERTURBATIONS} & (set(model_state) | set(mutable))
  if reserved:
    raise ValueError(
      f"value_and_relative_grad: {sorted(reserved)} cannot be in model_state or mutable: params are the "
      "first argument, and the relative-gradient bookkeeping owns 'intermediates' and 'perturbations' "
      "(read what your model sows with has_aux and Module.sow into another collection)."
    )
  missing = [name for name in mutable if name not in model_state]
  if missing:
    raise ValueError(
      f"value_and_relative_grad: mutable names {missing} but model_state holds no such collection; "
      "pass their current values, e.g. model_state={'batch_stats': variables['batch_stats']}."
    )
  return model_state


def _preactivations(intermediates: PyTree) -> PyTree:
  """The flow layers' sown pre-activations, without anything else the model sowed."""
  flat = flax.traverse_util.flatten_dict(intermediates)
  return flax.traverse_util.unflatten_dict(
    {p: v for p, v in flat.items() if p[-1] == PREACTIVATION}
  )


def nll(module: nn.Module, x: jax.Array, *args: Any) -> jax.Array:
  """The loss −mean log p(x | context) of a module with `log_prob` (`FlowMLP`, or
  `ConditionalFlowMLP` with the context as the further argument), averaged over every leading
  axis of x."""
  if not hasattr(module, "log_prob"):
    raise ValueError(
      f"{type(module).__name__} has no log_prob method; write the loss of your model as "
      "loss_fn(module, *args) and pass it to value_and_relative_grad."
    )
  return -jnp.mean(module.log_prob(x, *args))


def value_and_exact_grad(
  model: nn.Module, params: PyTree, x: jax.Array, *args: Any
) -> tuple[jax.Array, PyTree]:
  """Batch-mean exact NLL −log p(x | `*args`) and its Euclidean gradient, autodiff through
  `slogdet` (O(D³) per layer)."""
  return jax.value_and_grad(lambda p: model.apply({"params": p}, x, *args, method=nll))(params)
