"""The exact relative gradient of dense flow layers, from their pre-activations, δ and λ.

For a flow layer y = z W + b (W: (D, D), b: (D,)) inside a loss, write δ = ∂loss/∂y (one row
per D-vector the layer mapped), u = y − b = z W, g_b = Σ_rows δ, and λ = ∂loss/∂log|det W|
(−1 for the batch mean of −log p(x)). The Euclidean gradient of the loss is
G_W = zᵀ δ + λ W⁻ᵀ and g_b. Writing the layer as the augmented matrix Ŵ = [[W, 0], [b, 1]]
and premultiplying the gradient by Ŵ Ŵᵀ (docs/method.md, "Exact relative gradient") gives

    ΔW = W uᵀ δ + (W bᵀ) g_b + λ W
    Δb = (1 + b bᵀ) g_b + (u bᵀ)ᵀ δ + λ b

No inverse and no slogdet: O(B·D²) per layer. Ŵ Ŵᵀ is positive definite for invertible W, so
following −(ΔW, Δb) descends the loss, and the fixed points are those of exact maximum
likelihood. A loss that also reads W or b directly (a penalty, a tied weight) adds a gradient
(G_W', g_b') that y, δ and λ do not carry; its term is Ŵ Ŵᵀ Ĝ' itself
(`_augmented_metric_product`, O(D³)). `relative_gradients` (for `value_and_relative_grad`,
whose pass returns that gradient alone in the flow leaves) puts the sum in place of a gradient
tree's flow-layer leaves; `checked_relative_gradients` (for `relative_jacobian()`, which
receives the whole Euclidean gradient and finds that part in `RelativeArgs.direct_grads`)
does the same and adds the transform's run-time check. What both bindings' passes
share is here too: `make_placeholders` (zero perturbations and log-det placeholders),
`check_scalar_loss`, `enclosing_sources` (what a layer is applied under) and
`refuse_differentiation` (the pass's results are not differentiable).
"""

from __future__ import annotations

from collections.abc import Iterator
from collections.abc import Mapping
import os
import sys
import types
from typing import Any, NamedTuple

import flax.traverse_util
import jax
import jax.numpy as jnp

from flax_relgrad.core.dense import LOG_ABS_DET
from flax_relgrad.core.dense import PREACTIVATION
from flax_relgrad.core.dense import factorisation_dtype
from flax_relgrad.core.dense import kernel_log_abs_det

PyTree = Any
Path = tuple[str, ...]


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
  if kernel.shape != (width, width) or preactivation.shape[-1:] != (width,):
    raise ValueError(
      f"relative_layer_update needs a (D, D) kernel and pre-activations (..., D), got kernel "
      f"{kernel.shape} and pre-activations {preactivation.shape}."
    )
  if delta.shape != preactivation.shape:
    raise ValueError(
      f"δ must have the pre-activations' shape {preactivation.shape}, got {delta.shape}."
    )
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


class RelativeArgs(NamedTuple):
  """What turns the Euclidean gradient of a relative-gradient pass into the relative one.

  Made by `value_grad_and_relative_args` (Linen) or `flax_relgrad.nnx.value_grad_and_relative_args`,
  read by `relative_gradients` and `relative_jacobian()`; a pytree, so it passes through
  `jax.jit` and `lax.scan`.

  Attributes:
    preactivations: at each flow layer's path P, P/preactivation: a tuple with the layer's y
      of every call.
    perturbation_grads: at P, P/preactivation (δ = ∂loss/∂y of every call) and
      P/log_abs_det (λ = ∂loss/∂log|det W|); from `value_grad_and_relative_args` also
      P/kernel and P/bias, the layer's own Euclidean gradient (zᵀ δ and Σ δ, summed over the
      steps of a layer shared by `nn.scan`).
    direct_grads: at P, P/kernel and P/bias: the gradient of what the loss does with the
      layer's W and b besides applying the layer (a penalty, a tied weight; zero for a plain
      likelihood), from `value_grad_and_relative_args`; None from the pass of
      `value_and_relative_grad`, whose grads hold it in the flow leaves.
  """

  preactivations: PyTree
  perturbation_grads: PyTree
  direct_grads: PyTree = None


def relative_gradients(params: PyTree, grads: PyTree, relative_args: RelativeArgs) -> PyTree:
  """`value_and_relative_grad`'s rewrite: every flow layer's kernel and bias leaves become its
  exact relative gradient, the other leaves stay.

  `grads` come from a pass in which the flow layers computed y from `stop_gradient` of their
  params, so a flow layer's leaves hold (G_W, g_b) of what the loss does with W and b
  *besides* the layer (a penalty on W, a tied weight): zero for a plain likelihood. The
  result is the update from y, δ and λ plus `_augmented_metric_product` of those leaves,
  which is computed (O(D³)) only when one of them is non-zero.

  Args:
    params: the parameters the gradients were taken at.
    grads: those autodiff gradients (nested dicts, or an NNX `nnx.State`).
    relative_args: the flow layers' y, δ and λ from the same pass.

  Returns:
    A tree like `grads`, each leaf in its dtype (that of its parameter: a bfloat16 kernel
    gets a bfloat16 ΔW, so optimizer states keep their dtypes).
  """
  direct = _flat_leaves(grads)
  layers = [_with_direct_terms(layer, direct) for layer in _layer_updates(params, relative_args)]
  return _replace_flow_leaves(grads, layers)


def add_own_gradients(grads: PyTree, perturbation_grads: PyTree) -> tuple[PyTree, PyTree, PyTree]:
  """The Euclidean gradient from a pass with stand-ins (`value_grad_and_relative_args`):
  every flow layer's leaves of `grads` (what the loss does with W and b besides the layer)
  plus the layer's own gradient from its stand-ins in `perturbation_grads`; those leaves
  alone, as `RelativeArgs.direct_grads` ({P: {kernel, bias}}); and `perturbation_grads` with
  each stand-in's gradient in its param's shape and dtype (summed over the steps of a layer
  shared by nn.scan, so that `RelativeArgs` hold D² per layer, not T·D²)."""
  flat_perturbations = _flat(perturbation_grads)
  own = {path: g for path, g in flat_perturbations.items() if path[-1] in ("kernel", "bias")}
  direct = {}

  def add(key_path: tuple[Any, ...], leaf: jax.Array) -> jax.Array:
    path = _path(key_path)
    if path not in own:
      return leaf
    unstacked = 2 if path[-1] == "kernel" else 1
    if own[path].shape != leaf.shape and (
      leaf.ndim != unstacked or own[path].shape[-unstacked:] != leaf.shape
    ):
      raise ValueError(
        f"flow layer '{'/'.join(path[:-1])}' has {path[-1]} {leaf.shape} but its stand-in's "
        f"gradient is {own[path].shape}: under nn.vmap or nn.scan, use axis 0 for 'params', "
        "'intermediates' and 'perturbations', or broadcast 'params' (variable_broadcast) "
        "without stacking them elsewhere."
      )
    direct[path] = leaf
    extra = own[path].ndim - leaf.ndim  # The steps of a layer shared by nn.scan or nn.vmap.
    flat_perturbations[path] = own[path].sum(tuple(range(extra))).astype(leaf.dtype)
    return leaf + flat_perturbations[path]

  total = jax.tree_util.tree_map_with_path(add, grads)
  unflatten = flax.traverse_util.unflatten_dict
  return total, unflatten(direct), unflatten(flat_perturbations)


def _augmented_metric_product(
  kernel: jax.Array, bias: jax.Array | None, kernel_grad: jax.Array, bias_grad: jax.Array | None
) -> tuple[jax.Array, jax.Array | None]:
  """Ŵ Ŵᵀ Ĝ restricted to (W, b) for any Euclidean gradient (G_W, g_b), O(D³).

  With Ŵ = [[W, 0], [b, 1]] and Ĝ = [[G_W, 0], [g_b, 0]], Ŵᵀ Ĝ = [[M, 0], [g_b, 0]] with
  M = Wᵀ G_W + bᵀ g_b (bᵀ g_b the outer product), so ΔW = W M and Δb = g_b + b M; without a
  bias, ΔW = W Wᵀ G_W. Leading axes (a stack of kernels) broadcast. Computed in at least
  float32, returned in that dtype.
  """
  dtype = jnp.promote_types(kernel.dtype, jnp.float32)
  kernel, kernel_grad = kernel.astype(dtype), kernel_grad.astype(dtype)
  metric = jnp.swapaxes(kernel, -1, -2) @ kernel_grad
  if bias is None or bias_grad is None:
    return kernel @ metric, None
  bias, bias_grad = bias.astype(dtype), bias_grad.astype(dtype)
  metric = metric + bias[..., :, None] * bias_grad[..., None, :]
  return kernel @ metric, bias_grad + (bias[..., None, :] @ metric)[..., 0, :]


def _with_direct_terms(layer: _LayerUpdate, leaves: dict[Path, jax.Array]) -> _LayerUpdate:
  """`layer` with `_augmented_metric_product` of its leaves in `leaves` (the loss's direct uses
  of W and b) added to its updates, under a `lax.cond` that skips the O(D³) products when
  those leaves are all zero."""
  kernel_grad = leaves[layer.kernel_path]
  bias_grad = None if layer.bias_path is None else leaves[layer.bias_path]
  grads = (kernel_grad,) if bias_grad is None else (kernel_grad, bias_grad)
  used = jnp.any(jnp.stack([jnp.any(grad != 0) for grad in grads]))

  def direct_terms() -> tuple[jax.Array, ...]:
    kernel_term, bias_term = _augmented_metric_product(
      layer.kernel, layer.bias, kernel_grad, bias_grad
    )
    return (kernel_term,) if bias_term is None else (kernel_term, bias_term)

  dtype = jnp.promote_types(layer.kernel.dtype, jnp.float32)
  terms = jax.lax.cond(
    used, direct_terms, lambda: tuple(jnp.zeros(grad.shape, dtype) for grad in grads)
  )
  paths = (layer.kernel_path,) if layer.bias_path is None else (layer.kernel_path, layer.bias_path)
  replacements = dict(layer.replacements)
  for path, term in zip(paths, terms, strict=True):
    replacements[path] = replacements[path] + term
  return layer._replace(replacements=replacements)


def checked_relative_gradients(
  params: PyTree, grads: PyTree, relative_args: RelativeArgs
) -> tuple[PyTree, jax.Array]:
  """`relative_jacobian()`'s step: `grads` (the Euclidean gradient of a
  `value_grad_and_relative_args` pass) with every flow layer's leaves replaced by its exact
  relative gradient (the update from y, δ and λ plus the `direct_grads` term, as
  `relative_gradients`), and `_euclidean_mismatch`'s verdict on `grads` (a boolean scalar)."""
  if isinstance(relative_args, RelativeArgs) and relative_args.direct_grads is None:
    raise ValueError(
      "relative_args hold no direct_grads: make them with value_grad_and_relative_args."
    )
  layers = _layer_updates(params, relative_args)
  direct = _flat(relative_args.direct_grads)
  layers = [_with_direct_terms(layer, direct) for layer in layers]
  return _replace_flow_leaves(grads, layers), _euclidean_mismatch(grads, layers, direct)


def _replace_flow_leaves(grads: PyTree, layers: list[_LayerUpdate]) -> PyTree:
  """`grads` with the flow layers' leaves replaced by their updates, cast to the leaves' dtypes."""
  replacements = {path: update for layer in layers for path, update in layer.replacements.items()}

  def replace(key_path: tuple[Any, ...], leaf: jax.Array) -> jax.Array:
    update = replacements.get(_path(key_path))
    return leaf if update is None else update.astype(leaf.dtype)

  return jax.tree_util.tree_map_with_path(replace, grads)


def _euclidean_mismatch(
  grads: PyTree, layers: list[_LayerUpdate], direct: dict[Path, jax.Array]
) -> jax.Array:
  """Whether finite `grads` are not the Euclidean gradient that `layers` were made with (a
  boolean scalar): they were scaled, clipped, accumulated, averaged, decayed or otherwise
  changed, come from another batch, or `params` are not the ones they were taken at.
  Non-finite grads are not a mismatch: they make a non-finite update, as a diverged step does
  with any optimizer.

  Per flow layer, two checks:
  - each received leaf must equal the pass's own gradient plus its direct one (the sum the
    pass returned, recomputed from `relative_args`), within ε of their magnitudes (ε of the
    leaf's dtype): any change to the gradient beyond rounding is caught;
  - the params must be those of the pass: the own kernel gradient zᵀ δ must satisfy
    ⟨zᵀ δ, W⟩ = Σ_rows (y − b)·δ (as z W = y − b), O(B·D), within 1e-3 of the expected value
    plus √ε times the sum of the absolute terms, so params that differ by less than about
    1e-3 of their gradient's effect can pass.
  """
  leaves = _flat_leaves(grads)
  mismatches, finite = [], []
  for layer in layers:
    if layer.own_grads is None:
      raise ValueError(
        "relative_args hold no flow layer's own gradient (perturbations at P/kernel): make "
        "them with value_grad_and_relative_args."
      )
    accumulate = jnp.promote_types(layer.kernel_inner.dtype, jnp.float32)
    for path, own in layer.own_grads.items():
      received = leaves[path]
      expected = direct[path] + own  # The sum the pass returned: equal but for a rounding.
      scale = jnp.abs(direct[path].astype(accumulate)) + jnp.abs(own.astype(accumulate))
      error = jnp.linalg.norm((received.astype(accumulate) - expected.astype(accumulate)).ravel())
      allowed = jnp.finfo(received.dtype).eps * jnp.linalg.norm(scale.ravel())
      mismatches.append(~(error <= allowed))
      finite.append(jnp.all(jnp.isfinite(received)))
    own_kernel = layer.own_grads[layer.kernel_path]
    products = own_kernel.astype(accumulate) * layer.kernel.astype(accumulate)
    eps = max(jnp.finfo(layer.kernel.dtype).eps, jnp.finfo(layer.kernel_inner.dtype).eps)
    error = jnp.abs(products.sum() - layer.kernel_inner.astype(accumulate))
    allowed = 1e-3 * jnp.abs(layer.kernel_inner.astype(accumulate)) + jnp.sqrt(eps) * (
      layer.kernel_inner_abs.astype(accumulate) + jnp.abs(products).sum()
    )
    mismatches.append(~(error <= allowed))
  if not mismatches:
    return jnp.array(False)
  return jnp.all(jnp.stack(finite)) & jnp.any(jnp.stack(mismatches))


def _flat_leaves(tree: PyTree) -> dict[Path, jax.Array]:
  """{dict-key path: leaf} of a gradient or parameter tree (dicts or `nnx.State`)."""
  return {_path(key_path): leaf for key_path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _path(key_path: tuple[Any, ...]) -> Path:
  """The dict keys and sequence indices of a pytree path, as strings (the gradients of a tuple
  of NNX modules are a tuple of `nnx.State`s); the attribute keys that `nnx.State` adds around
  its leaves are dropped."""
  return tuple(
    str(key.key) if isinstance(key, jax.tree_util.DictKey) else str(key.idx)
    for key in key_path
    if isinstance(key, (jax.tree_util.DictKey, jax.tree_util.SequenceKey))
  )


class _LayerUpdate(NamedTuple):
  """One flow layer's relative update and the sums that fingerprint its Euclidean gradient."""

  replacements: dict[Path, jax.Array]
  kernel: jax.Array
  bias: jax.Array | None
  kernel_path: Path
  bias_path: Path | None
  own_grads: dict[Path, jax.Array] | None  # the stand-ins' gradients zᵀ δ, Σ δ, if made
  kernel_inner: jax.Array  # Σ_rows (y − b)·δ = ⟨zᵀ δ, W⟩
  kernel_inner_abs: jax.Array  # Σ_rows |y − b|·|δ|


def _flat(tree: Mapping[Any, Any], prefix: Path = ()) -> dict[Path, Any]:
  """{path with str keys: leaf} of nested mappings (dicts, FrozenDicts, `nnx.State`); tuples
  (one pre-activation per call) are leaves."""
  flat = {}
  for key, value in tree.items():
    path = prefix + (str(key),)
    flat.update(_flat(value, path) if isinstance(value, Mapping) else {path: value})
  return flat


def _layer_updates(params: PyTree, relative_args: RelativeArgs) -> list[_LayerUpdate]:
  """Every flow layer's relative update (kernel and bias leaves) and fingerprint sums."""
  if not isinstance(relative_args, RelativeArgs):
    raise TypeError(
      f"relative_args must be the RelativeArgs that value_grad_and_relative_args returns, got "
      f"{type(relative_args).__name__}."
    )
  flat_params = _flat_leaves(params)
  flat_intermediates = _flat(relative_args.preactivations)
  flat_perturbations = _flat(relative_args.perturbation_grads)
  layers = sorted(
    {path[:-1] for path in flat_perturbations if path[-1] in (PREACTIVATION, LOG_ABS_DET)}
  )
  if not layers:
    raise ValueError(
      "relative_args hold no flow layer: they must come from value_grad_and_relative_args."
    )
  updates = []
  for layer_path in layers:
    layer = "/".join(layer_path) or "<root>"
    layer_params = {
      path[len(layer_path)]: leaf if len(path) == len(layer_path) + 1 else None
      for path, leaf in flat_params.items()
      if len(path) > len(layer_path) and path[: len(layer_path)] == layer_path
    }
    deltas = flat_perturbations.get(layer_path + (PREACTIVATION,))
    log_det_grad = flat_perturbations.get(layer_path + (LOG_ABS_DET,))
    ys = flat_intermediates.get(layer_path + (PREACTIVATION,))
    kernel, bias, log_det_grad = _check_layer(layer, layer_params, ys, deltas, log_det_grad)
    kernel, bias = refuse_differentiation((kernel, bias))
    stacked = kernel.ndim - 2
    width = kernel.shape[-1]

    def rows(arrays, stacked=stacked, width=width):
      return jnp.concatenate(
        [a.reshape(a.shape[:stacked] + (-1, width)) for a in arrays], axis=stacked
      )

    update = relative_layer_update
    for _ in range(stacked):
      update = jax.vmap(update, in_axes=(0, None if bias is None else 0, 0, 0, 0))
    y, delta = rows(ys), rows(deltas)
    kernel_update, bias_update = update(kernel, bias, y, delta, log_det_grad)
    replacements = {layer_path + ("kernel",): kernel_update}
    if bias is not None and bias_update is not None:
      replacements[layer_path + ("bias",)] = bias_update
      y = y - jnp.expand_dims(bias, -2)
    updates.append(
      _LayerUpdate(
        replacements,
        kernel,
        bias,
        layer_path + ("kernel",),
        None if bias is None else layer_path + ("bias",),
        _own_grads(flat_perturbations, layer_path, bias is not None),
        (y * delta).sum(),
        (jnp.abs(y) * jnp.abs(delta)).sum(),
      )
    )
  return updates


def _own_grads(
  flat_perturbations: dict[Path, Any], layer_path: Path, has_bias: bool
) -> dict[Path, jax.Array] | None:
  """{param path: its stand-in's gradient} of one layer, or None for a pass without them."""
  names = ("kernel", "bias") if has_bias else ("kernel",)
  paths = [layer_path + (name,) for name in names]
  if any(path not in flat_perturbations for path in paths):
    return None
  return {path: flat_perturbations[path] for path in paths}


def _check_layer(
  layer: str,
  layer_params: dict[str, Any],
  preactivations: tuple[jax.Array, ...] | None,
  deltas: tuple[jax.Array, ...] | None,
  log_det_grad: jax.Array | None,
) -> tuple[jax.Array, jax.Array | None, jax.Array]:
  """The layer's (kernel, bias, λ) after checking everything the update relies on."""
  prefix = f"flow layer '{layer}'"
  kernel = layer_params.get("kernel")
  bias = layer_params.get("bias")
  if kernel is None:
    raise ValueError(f"{prefix} was applied but params hold no kernel at '{layer}/kernel'.")
  others = sorted(set(layer_params) - {"kernel", "bias"})
  if others:
    raise ValueError(
      f"{prefix} has params {others} beside kernel and bias. Its sown pre-activation must be "
      "z @ kernel + bias with its own kernel and bias only; put context-dependent shifts or "
      "scales in a separate module applied after the FlowDense (see ConditionalFlowMLP)."
    )
  if preactivations is None or deltas is None:
    raise ValueError(f"{prefix}: the loss uses its log|det W| but never applies the layer.")
  if log_det_grad is None:
    raise ValueError(
      f"{prefix}: the relative args hold no log-det gradient for it; make them with value_grad_and_relative_args."
    )
  if kernel.ndim < 2 or kernel.shape[-1] != kernel.shape[-2]:
    raise ValueError(
      f"{prefix} has a kernel of shape {kernel.shape}; the relative gradient needs square "
      "(D, D) kernels, or (E, D, D) for E layers stacked by nn.vmap."
    )
  stack_shape, width = kernel.shape[:-2], kernel.shape[-1]
  if bias is not None and bias.shape != stack_shape + (width,):
    raise ValueError(f"{prefix} has bias {bias.shape}, expected {stack_shape + (width,)}.")
  if stack_shape == () and jnp.ndim(log_det_grad) > 0:
    # One kernel used at every step of nn.scan (or nn.vmap) with broadcast params: its Ĝ is
    # the sum over the steps, so λ sums and every step's rows join the layer's rows.
    log_det_grad = jnp.sum(log_det_grad)
  if jnp.shape(log_det_grad) != stack_shape:
    raise ValueError(
      f"{prefix} has a log-det gradient of shape {jnp.shape(log_det_grad)}, expected "
      f"{stack_shape}: under nn.vmap or nn.scan, use axis 0 for 'params', 'intermediates' and "
      "'perturbations'."
    )
  for call, (y, delta) in enumerate(zip(preactivations, deltas, strict=True)):
    if y.shape != delta.shape or y.shape[-1] != width or y.shape[: len(stack_shape)] != stack_shape:
      raise ValueError(
        f"{prefix} (call {call + 1}) has pre-activation {y.shape} and δ {delta.shape}, but "
        f"both must be {stack_shape + ('...', width)}: under nn.vmap or nn.scan, use axis 0 "
        "for 'params', 'intermediates' and 'perturbations'."
      )
  if sum(y.size for y in preactivations) == 0:
    raise ValueError(f"{prefix} was applied to an empty batch; there is nothing to learn from.")
  return kernel, bias, log_det_grad


def make_placeholders(
  discovered: PyTree,
  params: PyTree,
  exact_loss: bool,
  require_log_det: bool,
) -> PyTree:
  """Zero perturbations shaped like the discovered ones (`{layer path: {PREACTIVATION: (y per
  call,), LOG_ABS_DET: ..., and the stand-ins "kernel" and "bias" if discovered}}`); log-det
  placeholders filled in (both bindings' passes)."""
  flat = flax.traverse_util.flatten_dict(discovered)
  layers = {path[:-1] for path in flat if path[-1] in (PREACTIVATION, LOG_ABS_DET)}
  if not layers:
    raise ValueError(
      "value_and_relative_grad: the loss applies no flow layer (FlowDense); the relative "
      "gradient is for models that contain one. Use jax.value_and_grad otherwise."
    )
  flat_params = flax.traverse_util.flatten_dict(params)
  placeholders: dict[tuple[str, ...], Any] = {}
  for layer in sorted(layers):
    name = "/".join(map(str, layer)) or "<root>"
    preactivations = flat.get(layer + (PREACTIVATION,), ())
    for y in preactivations:
      if y.size == 0:
        raise ValueError(
          f"value_and_relative_grad: flow layer '{name}' was applied to an empty batch {y.shape}."
        )
    placeholders[layer + (PREACTIVATION,)] = tuple(
      jnp.zeros(y.shape, y.dtype) for y in preactivations
    )
    kernel = flat_params.get(layer + ("kernel",))
    if kernel is None:
      raise ValueError(
        f"value_and_relative_grad: the params hold no kernel at flow layer '{name}'. If its "
        "nnx.Param is shared with another module (a tied weight), the model's state lists it "
        "under the other module's path: let the other module read the flow layer's "
        "kernel[...] instead of holding the same Param."
      )
    # One value per kernel; under nn.scan with broadcast params, one per step (shape (T,)).
    discovered_log_det = flat.get(layer + (LOG_ABS_DET,))
    shape = kernel.shape[:-2] if discovered_log_det is None else discovered_log_det.shape
    if exact_loss:
      log_abs_det = jnp.broadcast_to(kernel_log_abs_det(jax.lax.stop_gradient(kernel)), shape)
    else:
      log_abs_det = jnp.zeros(shape, factorisation_dtype(kernel.dtype))
    # Unused by a loss without the log-det (require_log_det=False), it gets gradient λ = 0.
    placeholders[layer + (LOG_ABS_DET,)] = log_abs_det
    for param in ("kernel", "bias"):  # stand-ins, for value_grad_and_relative_args
      if layer + (param,) in flat:
        stand_in = flat[layer + (param,)]
        placeholders[layer + (param,)] = jnp.zeros(stand_in.shape, stand_in.dtype)
    if layer + (LOG_ABS_DET,) not in flat and require_log_det:
      raise ValueError(
        f"value_and_relative_grad: the loss applies flow layer '{name}' but never uses its "
        "log|det W|, so it is not a likelihood (use log_prob or forward_and_log_det, which "
        "include it). If the loss truly does not contain it, pass require_log_det=False."
      )
  return flax.traverse_util.unflatten_dict(placeholders)


def check_scalar_loss(loss: Any) -> None:
  if isinstance(loss, (tuple, list)):
    raise ValueError(
      f"value_and_relative_grad: loss_fn returned a {type(loss).__name__} of {len(loss)}, not "
      "a scalar loss: for (loss, aux), pass has_aux=True."
    )
  if jnp.shape(loss) != ():
    raise ValueError(
      f"value_and_relative_grad: loss_fn must return a scalar loss, got shape {jnp.shape(loss)}"
      " (reduce over the batch, e.g. with .mean(); with has_aux=True return (loss, aux))."
    )


def enclosing_sources(stop: types.FrameType | None) -> Iterator[tuple[str, types.FrameType]]:
  """(source file, with '/' separators; frame) of every frame that called the caller, from
  the innermost outward, up to but not including `stop` (all of them if `stop` is None).

  JAX traces a function under a transform (differentiation, a loop) through Python, so the
  transform's own functions are on the call stack between the loss and a flow layer it
  applies: the passes read from here what a layer is applied under."""
  frame: types.FrameType | None = sys._getframe(2)
  while frame is not None and frame is not stop:
    yield frame.f_code.co_filename.replace(os.sep, "/"), frame
    frame = frame.f_back


def differentiates(source: str, frame: types.FrameType) -> bool:
  """Whether `frame` (from `enclosing_sources`) is JAX differentiating the function it traces
  (jax.grad, jax.vjp, jax.jvp, jax.jacfwd, and Flax's lifted nn.grad, nn.vjp, nn.jvp,
  nnx.grad): a function of JAX's autodiff interpreter, or jax.jvp's and jax.linearize's own
  frames (older JAX runs the traced function of forward mode from outside the interpreter)."""
  return source.endswith("jax/_src/interpreters/ad.py") or (
    source.endswith("jax/_src/api.py") and frame.f_code.co_name in ("_jvp", "linearize")
  )


DIFFERENTIATED_PASS = (
  "value_and_relative_grad: its result is being differentiated with respect to flow layers' "
  "params (jax.grad or jax.jvp through a training step: meta-learning, unrolled optimisation, "
  "a hypergradient). The pass reads every flow layer's W and b through stop_gradient, so "
  "those derivatives would be wrong. Differentiate through a step that uses "
  "jax.value_and_grad of the exact loss instead."
)


@jax.custom_jvp
def _undifferentiable(arrays: list[jax.Array]) -> list[jax.Array]:
  return arrays


@_undifferentiable.defjvp
def _refuse_jvp(primals: tuple[list[jax.Array]], tangents: tuple[list[jax.Array]]) -> Any:
  raise ValueError(DIFFERENTIATED_PASS)


def refuse_differentiation(tree: PyTree) -> PyTree:
  """`tree` unchanged, except that differentiating through any of its arrays (forward or
  reverse mode, at any depth of jax.jit) raises `DIFFERENTIATED_PASS` instead of giving a
  wrong derivative. Free at run time: the identity, with a differentiation rule that refuses.
  The rewrite reads every flow layer's W and b through it: the pass reads them through
  `stop_gradient`, so derivatives with respect to them would miss its part."""
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  where = [i for i, leaf in enumerate(leaves) if isinstance(leaf, jax.Array)]
  for i, guarded in zip(where, _undifferentiable([leaves[i] for i in where]), strict=True):
    leaves[i] = guarded
  return jax.tree_util.tree_unflatten(treedef, leaves)


def refuse_differentiation_of_flow_params(params: PyTree, discovered: PyTree) -> PyTree:
  """`params` with the kernel and bias of every layer in `discovered` (the discovery pass's
  `{layer path: ...}`) behind `refuse_differentiation`: the pass's raw results (its loss,
  Euclidean grads and `RelativeArgs`) then refuse differentiation with respect to them too."""
  layers = {tuple(map(str, path[:-1])) for path in flax.traverse_util.flatten_dict(discovered)}

  def guard(key_path: tuple[Any, ...], leaf: jax.Array) -> jax.Array:
    path = _path(key_path)
    if path[:-1] in layers and path[-1] in ("kernel", "bias"):
      return refuse_differentiation(leaf)
    return leaf

  return jax.tree_util.tree_map_with_path(guard, params)
