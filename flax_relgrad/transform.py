"""`relative_jacobian()`: the exact relative gradient of dense flow layers as an Optax transform.

For a flow layer y = z W + b (W: (D, D), b: (D,)) inside a loss, write δ = ∂loss/∂y (one row
per D-vector the layer mapped), u = y − b = z W, g_b = Σ_rows δ, and λ = ∂loss/∂log|det W|
(−1 for the batch mean of −log p(x)). The Euclidean gradient of the loss is
G_W = zᵀ δ + λ W⁻ᵀ and g_b. Writing the layer as the augmented matrix Ŵ = [[W, 0], [b, 1]]
and premultiplying the gradient by Ŵ Ŵᵀ (docs/method.md §1) gives

    ΔW = W uᵀ δ + (W bᵀ) g_b + λ W
    Δb = (1 + b bᵀ) g_b + (u bᵀ)ᵀ δ + λ b

No inverse and no slogdet: O(B·D²) per layer. It is a preconditioner (Ŵ Ŵᵀ is positive
definite for invertible W), so the fixed points are those of exact maximum likelihood.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import optax

from flax_relgrad.flow import LOG_ABS_DET, PREACTIVATION

PyTree = Any
Path = tuple[str, ...]


class RelativeJacobianState(NamedTuple):
  """State of `relative_jacobian()`: empty; it marks the transform's place in a chain."""


def relative_layer_update(
    kernel: jax.Array,
    bias: jax.Array | None,
    preactivation: jax.Array,
    delta: jax.Array,
    log_det_grad: jax.Array | float = -1.0,
) -> tuple[jax.Array, jax.Array | None]:
  """Exact relative gradient (ΔW, Δb) of one layer from its pre-activations and δ.

  Args:
    kernel: W, shape (D, D).
    bias: b, shape (D,), or None for a layer without bias.
    preactivation: y = z W + b, shape (..., D): every D-vector the layer mapped.
    delta: δ = ∂loss/∂y, same shape as `preactivation`.
    log_det_grad: λ = ∂loss/∂log|det W|; −1 for the batch mean of −log p(x).

  Returns:
    ΔW (D, D) and Δb (D,) (None without bias). The matmul association is chosen from the
    static number of rows R: (W uᵀ) δ costs 2·R·D², W (uᵀ δ) costs R·D² + D³.
  """
  width = kernel.shape[-1]
  u = preactivation.reshape(-1, width)
  delta = delta.reshape(-1, width)
  if bias is not None:
    # With ũ = [u; b] and δ̃ = [δ; g_b] (one extra row each), W uᵀ δ + (W bᵀ) g_b = W ũᵀ δ̃
    # and (1 + b bᵀ) g_b + (u bᵀ)ᵀ δ = g_b + (ũ bᵀ)ᵀ δ̃: one product instead of two.
    bias_grad = delta.sum(0)
    u = jnp.concatenate([u - bias, bias[None]], axis=0)
    delta = jnp.concatenate([delta, bias_grad[None]], axis=0)
  if u.shape[0] <= width:
    kernel_update = (kernel @ u.T) @ delta
  else:
    kernel_update = kernel @ (u.T @ delta)
  kernel_update = kernel_update + log_det_grad * kernel
  if bias is None:
    return kernel_update, None
  bias_update = bias_grad + (u @ bias) @ delta + log_det_grad * bias
  return kernel_update, bias_update


def relative_jacobian() -> optax.GradientTransformationExtraArgs:
  """Replaces the gradients of every flow layer by its exact relative gradient.

  `update(updates, state, params, *, intermediates, perturbations)` expects the extra args
  returned by :func:`flax_relgrad.value_and_relative_grad`: the pre-activations y sown by each
  flow layer (`intermediates`) and the gradient of the loss with respect to the
  `perturbations` collection (δ = ∂loss/∂y and λ = ∂loss/∂log|det W| per layer). For every
  flow layer found there, at path P, the kernel and bias updates at P are replaced by

      ΔW = W uᵀ δ + (W bᵀ) g_b + λ W,    Δb = (1 + b bᵀ) g_b + (u bᵀ)ᵀ δ + λ b,

  with u = y − b and g_b = Σ δ over every row the layer mapped (all calls, all leading axes):
  the relative gradient Ŵ Ŵᵀ Ĝ of the loss, log|det W| terms included, in O(B·D²). The
  incoming kernel and bias gradients are not read, so a jitted step never computes them. A
  layer mapped over a stacked axis (`nn.vmap`, kernels (E, D, D)) gets the update of each
  of its E kernels. All other leaves pass through unchanged.

  Put it first in the chain (`optax.chain(relative_jacobian(), ...)`): transforms before it
  would see the autodiff gradients of the flow layers, which are not the loss's gradients.

  Returns:
    An `optax.GradientTransformationExtraArgs` whose state is `RelativeJacobianState`.
  """

  def init_fn(params: PyTree) -> RelativeJacobianState:
    del params
    return RelativeJacobianState()

  def update_fn(
      updates: PyTree,
      state: RelativeJacobianState,
      params: PyTree | None = None,
      *,
      intermediates: Mapping[str, Any] | None = None,
      perturbations: Mapping[str, Any] | None = None,
      **extra_args: Any,
  ) -> tuple[PyTree, RelativeJacobianState]:
    del extra_args
    if params is None or intermediates is None or perturbations is None:
      raise ValueError(
          "relative_jacobian needs params and the extra args `intermediates` and "
          "`perturbations`: call tx.update(grads, opt_state, params, **extra) with the "
          "extra args returned by flax_relgrad.value_and_relative_grad."
      )
    replacements = _relative_updates(params, intermediates, perturbations)
    missing = set(replacements)

    def replace(key_path, leaf):
      path = tuple(str(getattr(key, "key", key)) for key in key_path)
      if path in replacements:
        missing.discard(path)
        return replacements[path]
      return leaf

    new_updates = jax.tree_util.tree_map_with_path(replace, updates)
    if missing:
      raise ValueError(
          f"relative_jacobian: the gradients have no leaf at {sorted('/'.join(p) for p in missing)}"
          " although params do; pass gradients with the same structure as params."
      )
    return new_updates, state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _flat(tree: Mapping[Any, Any], prefix: Path = ()) -> dict[Path, Any]:
  """{path with str keys: leaf} of nested mappings (dicts, FrozenDicts, `nnx.State`); tuples
  (one pre-activation per call) are leaves."""
  flat = {}
  for key, value in tree.items():
    path = prefix + (str(key),)
    flat.update(_flat(value, path) if isinstance(value, Mapping) else {path: value})
  return flat


def _relative_updates(params: PyTree, intermediates: PyTree, perturbations: PyTree) -> dict[Path, jax.Array]:
  """{path of a kernel or bias leaf: its relative update} for every flow layer."""
  flat_params = _flat(params)
  flat_intermediates = _flat(intermediates)
  flat_perturbations = _flat(perturbations)
  layers = sorted({path[:-1] for path in flat_perturbations if path[-1] in (PREACTIVATION, LOG_ABS_DET)})
  if not layers:
    raise ValueError(
        "relative_jacobian: the extra args name no flow layer (no pre-activation or log-det "
        "gradient in `perturbations`); pass the extra args that "
        "flax_relgrad.value_and_relative_grad returns for this model and batch."
    )
  replacements = {}
  for layer_path in layers:
    layer = "/".join(layer_path) or "<root>"
    layer_params = {
        path[len(layer_path)]: leaf if len(path) == len(layer_path) + 1 else None
        for path, leaf in flat_params.items()
        if len(path) > len(layer_path) and path[: len(layer_path)] == layer_path
    }
    deltas = flat_perturbations.get(layer_path + (PREACTIVATION,))
    log_det_grad = flat_perturbations.get(layer_path + (LOG_ABS_DET,))
    preactivations = flat_intermediates.get(layer_path + (PREACTIVATION,))
    kernel, bias = _check_layer(layer, layer_params, preactivations, deltas, log_det_grad)
    stacked = kernel.ndim - 2
    width = kernel.shape[-1]
    rows = lambda arrays: jnp.concatenate(
        [a.reshape(a.shape[:stacked] + (-1, width)) for a in arrays], axis=stacked
    )
    update = relative_layer_update
    for _ in range(stacked):
      update = jax.vmap(update, in_axes=(0, None if bias is None else 0, 0, 0, 0))
    kernel_update, bias_update = update(kernel, bias, rows(preactivations), rows(deltas), log_det_grad)
    replacements[layer_path + ("kernel",)] = kernel_update
    if bias is not None:
      replacements[layer_path + ("bias",)] = bias_update
  return replacements


def _check_layer(
    layer: str,
    layer_params: dict[str, jax.Array],
    preactivations: tuple[jax.Array, ...] | None,
    deltas: tuple[jax.Array, ...] | None,
    log_det_grad: jax.Array | None,
) -> tuple[jax.Array, jax.Array | None]:
  """The layer's (kernel, bias) after checking everything the update relies on."""
  prefix = f"relative_jacobian: flow layer '{layer}'"
  kernel = layer_params.get("kernel")
  bias = layer_params.get("bias")
  if kernel is None:
    raise ValueError(
        f"{prefix} is in the extra args but params hold no kernel at '{layer}/kernel'; params "
        "and extra args must come from the same model."
    )
  others = sorted(set(layer_params) - {"kernel", "bias"})
  if others:
    raise ValueError(
        f"{prefix} has params {others} beside kernel and bias. Its sown pre-activation must be "
        "z @ kernel + bias with its own kernel and bias only; put context-dependent shifts or "
        "scales in a separate module applied after the FlowDense (see ConditionalFlowMLP)."
    )
  if preactivations is None or deltas is None:
    raise ValueError(
        f"{prefix} has a log-det gradient but no sown pre-activation or δ: the loss uses its "
        "log|det W| but never applies the layer, or the extra args are incomplete."
    )
  if log_det_grad is None:
    raise ValueError(
        f"{prefix} has no log|det W| gradient in the extra args: build them with "
        "flax_relgrad.value_and_relative_grad (the loss must use the layer's log-det)."
    )
  if kernel.ndim < 2 or kernel.shape[-1] != kernel.shape[-2]:
    raise ValueError(
        f"{prefix} has a kernel of shape {kernel.shape}; the relative gradient needs square "
        "(D, D) kernels, or (E, D, D) for E layers stacked by nn.vmap."
    )
  stack_shape, width = kernel.shape[:-2], kernel.shape[-1]
  if bias is not None and bias.shape != stack_shape + (width,):
    raise ValueError(f"{prefix} has bias {bias.shape}, expected {stack_shape + (width,)}.")
  if jnp.shape(log_det_grad) != stack_shape:
    raise ValueError(
        f"{prefix} has a log-det gradient of shape {jnp.shape(log_det_grad)}, expected "
        f"{stack_shape}; params and extra args must come from the same model."
    )
  if not isinstance(preactivations, tuple) or not isinstance(deltas, tuple) or len(preactivations) != len(deltas):
    raise ValueError(
        f"{prefix}: the sown pre-activations and δ do not match call for call; the extra args "
        "must come from one flax_relgrad.value_and_relative_grad call."
    )
  for call, (y, delta) in enumerate(zip(preactivations, deltas)):
    if y.shape != delta.shape or y.shape[-1] != width or y.shape[: len(stack_shape)] != stack_shape:
      raise ValueError(
          f"{prefix} (call {call + 1}) has pre-activation {y.shape} and δ {delta.shape}, but "
          f"both must be {stack_shape + ('...', width)} and equal: build the extra args from "
          "the current batch (flax_relgrad.value_and_relative_grad does), not from init's."
      )
  if sum(y.size for y in preactivations) == 0:
    raise ValueError(f"{prefix} was applied to an empty batch; there is nothing to learn from.")
  return kernel, bias
