"""`relative_jacobian()`: the exact relative gradient of a dense flow as an Optax transform.

For a flow layer y = z W + b inside a loss whose mean over the batch is minimised, with
δ = ∂loss/∂y (B, D) and u = y − b = z W (B, D), the Euclidean gradients of the autodiff part
of the loss are G_W = zᵀ δ and g_b = Σ_batch δ. Writing the layer as the augmented matrix
Ŵ = [[W, 0], [b, 1]] and premultiplying the gradient by Ŵ Ŵᵀ gives (ENGINEERING.md §1)

    ΔW = W uᵀ δ + (W bᵀ) g_b − λ W
    Δb = (1 + b bᵀ) g_b + (u bᵀ)ᵀ δ − λ b

where the −λW, −λb terms are the relative gradient of −λ·log|det W| (λ = `log_det_weight`,
1 for a batch-mean negative log-likelihood). No inverse, no slogdet: O(B·D²) per layer.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax

from flax_relgrad.flow import PREACTIVATION

PyTree = Any


def _path_names(key_path: tuple[Any, ...]) -> tuple[str, ...]:
  names = []
  for key in key_path:
    for attribute in ("key", "name", "idx"):
      if hasattr(key, attribute):
        names.append(str(getattr(key, attribute)))
        break
    else:
      names.append(str(key))
  return tuple(names)


def _leaves_by_path(tree: PyTree) -> dict[tuple[str, ...], Any]:
  """{path of names: leaf}; a length-1 tuple (what `sow` stores) counts as its element."""
  flat = {}
  is_sown = lambda node: isinstance(node, tuple) and len(node) == 1
  for key_path, leaf in jax.tree_util.tree_leaves_with_path(tree, is_leaf=is_sown):
    if isinstance(leaf, tuple):
      leaf = leaf[0]
    flat[_path_names(key_path)] = leaf
  return flat


def relative_layer_update(
    kernel: jax.Array,
    bias: jax.Array | None,
    preactivation: jax.Array,
    delta: jax.Array,
    log_det_weight: float = 1.0,
) -> tuple[jax.Array, jax.Array | None]:
  """Exact relative gradient (ΔW, Δb) of one layer from its pre-activation and δ.

  Args:
    kernel: W, shape (D, D).
    bias: b, shape (D,), or None for a layer without bias.
    preactivation: y = z W + b, shape (..., D).
    delta: δ = ∂loss/∂y, same shape as `preactivation`.
    log_det_weight: λ, the weight of −log|det W| in the loss.

  Returns:
    ΔW (D, D) and Δb (D,) (None without bias). The matmul association is chosen from the
    static batch size: (W uᵀ) δ costs 2·B·D², W (uᵀ δ) costs B·D² + D³ (B + 1 rows with bias).
  """
  width = kernel.shape[0]
  u = preactivation.reshape(-1, width)
  delta = delta.reshape(-1, width)
  if bias is not None:
    # With ũ = [u; b] and δ̃ = [δ; g_b] (one extra row each), W uᵀ δ + (W bᵀ) g_b = W ũᵀ δ̃
    # and (1 + b bᵀ) g_b + (u bᵀ)ᵀ δ = g_b + (ũ bᵀ)ᵀ δ̃: one product instead of two.
    bias_grad = delta.sum(0)
    u = jnp.concatenate([u - bias, bias[None]], axis=0)
    delta = jnp.concatenate([delta, bias_grad[None]], axis=0)
  rows = u.shape[0]
  if rows <= width:
    kernel_update = (kernel @ u.T) @ delta
  else:
    kernel_update = kernel @ (u.T @ delta)
  kernel_update = kernel_update - log_det_weight * kernel
  if bias is None:
    return kernel_update, None
  bias_update = bias_grad + (u @ bias) @ delta - log_det_weight * bias
  return kernel_update, bias_update


def relative_jacobian(log_det_weight: float = 1.0) -> optax.GradientTransformationExtraArgs:
  """Replaces the gradients of every flow layer by its exact relative gradient.

  `update(updates, state, params, *, intermediates, perturbations)` expects the extra
  args returned by :func:`flax_relgrad.value_and_relative_grad_args`: the `intermediates`
  collection (pre-activations y sown by each `FlowDense`) and the gradient of the loss
  with respect to the `perturbations` collection (δ = ∂loss/∂y). For every layer found
  there (a `PREACTIVATION` entry at path P), the kernel and bias updates at P are replaced by

      ΔW = W uᵀ δ + (W bᵀ) g_b − λ W,    Δb = (1 + b bᵀ) g_b + (u bᵀ)ᵀ δ − λ b,

  with u = y − b and g_b = Σ_batch δ: the relative gradient Ŵ Ŵᵀ Ĝ of the loss *plus*
  −λ Σ_k log|det W_k|, computed in O(B·D²). The incoming kernel and bias gradients are not
  read (the loss must depend on a flow layer's parameters only through its output y), so a
  jitted step never computes them. All other leaves pass through unchanged.

  Args:
    log_det_weight: λ, the weight of the log-det term; 1.0 for a loss that is the batch
      *mean* of −log p(x), B for a batch sum.

  Returns:
    An `optax.GradientTransformationExtraArgs` with `optax.EmptyState`.
  """

  def init_fn(params: PyTree) -> optax.EmptyState:
    del params
    return optax.EmptyState()

  def update_fn(
      updates: PyTree,
      state: optax.EmptyState,
      params: PyTree | None = None,
      *,
      intermediates: Mapping[str, Any] | None = None,
      perturbations: Mapping[str, Any] | None = None,
      **extra_args: Any,
  ) -> tuple[PyTree, optax.EmptyState]:
    del extra_args
    if params is None or intermediates is None or perturbations is None:
      raise ValueError(
          "relative_jacobian needs params and the extra args `intermediates` and "
          "`perturbations`: call tx.update(grads, opt_state, params, **extra) with the "
          "extra args returned by flax_relgrad.value_and_relative_grad_args."
      )
    replacements = _relative_updates(params, intermediates, perturbations, log_det_weight)
    missing = set(replacements)

    def replace(key_path, leaf):
      names = _path_names(key_path)
      if names in replacements:
        missing.discard(names)
        return replacements[names]
      return leaf

    new_updates = jax.tree_util.tree_map_with_path(replace, updates)
    if missing:
      raise ValueError(
          f"relative_jacobian: the gradients have no leaf at {sorted('/'.join(p) for p in missing)}"
          " although params do; pass gradients with the same structure as params."
      )
    return new_updates, state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _relative_updates(
    params: PyTree,
    intermediates: PyTree,
    perturbations: PyTree,
    log_det_weight: float,
) -> dict[tuple[str, ...], jax.Array]:
  """{path of a kernel or bias leaf: its relative update} for every perturbed flow layer."""
  flat_params = _leaves_by_path(params)
  flat_intermediates = _leaves_by_path(intermediates)
  replacements = {}
  for path, delta in _leaves_by_path(perturbations).items():
    if path[-1] != PREACTIVATION:
      continue
    layer_path = path[:-1]
    layer = "/".join(layer_path) or "<root>"
    kernel = flat_params.get(layer_path + ("kernel",))
    bias = flat_params.get(layer_path + ("bias",))
    preactivation = flat_intermediates.get(path)
    if kernel is None:
      raise ValueError(
          f"relative_jacobian: layer '{layer}' has a perturbation but params hold no kernel at "
          f"'{layer}/kernel'; params, intermediates and perturbations must come from the "
          "same model."
      )
    if preactivation is None:
      raise ValueError(
          f"relative_jacobian: layer '{layer}' has a perturbation but no sown pre-activation "
          f"at '{'/'.join(path)}' in intermediates; apply the model with "
          "mutable=['intermediates'] (value_and_relative_grad_args does this)."
      )
    if kernel.ndim != 2 or kernel.shape[0] != kernel.shape[1]:
      raise ValueError(
          f"relative_jacobian: layer '{layer}' has a non-square kernel of shape {kernel.shape};"
          " the relative gradient needs square (D, D) flow layers."
      )
    width = kernel.shape[0]
    if preactivation.shape != delta.shape or delta.shape[-1] != width:
      raise ValueError(
          f"relative_jacobian: layer '{layer}' has pre-activation {preactivation.shape} and "
          f"δ {delta.shape}, but both must be (..., {width}) and equal; build the zero "
          "perturbations from the current batch, not from the batch used at init."
      )
    if bias is not None and bias.shape != (width,):
      raise ValueError(f"relative_jacobian: layer '{layer}' has bias {bias.shape}, expected ({width},).")
    kernel_update, bias_update = relative_layer_update(
        kernel, bias, preactivation, delta, log_det_weight
    )
    replacements[layer_path + ("kernel",)] = kernel_update
    if bias is not None:
      replacements[layer_path + ("bias",)] = bias_update
  return replacements
