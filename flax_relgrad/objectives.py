"""Losses and gradients for maximum-likelihood training of a `FlowMLP`.

Two ways to get an exact maximum-likelihood update:

- :func:`value_and_relative_grad_args` (fast, O(B·D²) per layer): differentiates only the
  per-example part of −log p(x), returns δ and the pre-activations, and lets
  :func:`flax_relgrad.relative_jacobian` add the log-det term as −W, −b.
- :func:`value_and_exact_grad` (naive, O(D³) per layer): autodiff through `slogdet`; the
  Euclidean gradient any flow library gives an unconstrained dense layer.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from flax_relgrad.flow import FlowMLP, standard_normal_log_prob

PyTree = Any


def _check_batch(model: FlowMLP, x: jax.Array) -> None:
  if x.ndim != 2:
    raise ValueError(
        f"{type(model).__name__} training expects a batch of shape (B, D), got {x.shape}; "
        "flatten images first (e.g. x.reshape(B, -1))."
    )


def zero_perturbations(model: FlowMLP, params: PyTree, x: jax.Array) -> PyTree:
  """Zero `perturbations` shaped like this batch's pre-activations (free under jit).

  A perturbation's shape is frozen by the batch it was made for, so build it per batch:
  the ones `init` returns only fit the init batch.
  """
  abstract = jax.eval_shape(
      lambda p, x: model.apply({"params": p}, x, mutable=["intermediates"])[1], params, x
  )
  return jax.tree_util.tree_map(
      lambda sown: jnp.zeros(sown[-1].shape, sown[-1].dtype),
      abstract["intermediates"],
      is_leaf=lambda node: isinstance(node, tuple),
  )


def value_and_relative_grad_args(
    model: FlowMLP, params: PyTree, x: jax.Array
) -> tuple[jax.Array, PyTree, dict[str, PyTree]]:
  """Loss, gradients and extra args for `relative_jacobian()`, for a batch x (B, D).

  The loss is the batch mean of −[Σ log N(z) + Σ log σ'(y)]: the negative log-likelihood
  *without* the data-independent −Σ_k log|det W_k|, which `relative_jacobian` accounts for
  (add `model.apply(..., method=FlowMLP.kernel_log_abs_det)` to report the full NLL).

  Returns:
    (loss, grads, extra) where grads has the structure of params and
    extra = {"intermediates": sown pre-activations, "perturbations": δ = ∂loss/∂y}, to be
    passed as `tx.update(grads, opt_state, params, **extra)`.
  """
  _check_batch(model, x)
  perturbations = zero_perturbations(model, params, x)

  def loss_fn(params, perturbations):
    (z, activation_log_det), state = model.apply(
        {"params": params, "perturbations": perturbations},
        x,
        method=FlowMLP.forward_and_activation_log_det,
        mutable=["intermediates"],
    )
    loss = -jnp.mean(standard_normal_log_prob(z) + activation_log_det)
    return loss, state["intermediates"]

  (loss, intermediates), (grads, deltas) = jax.value_and_grad(
      loss_fn, argnums=(0, 1), has_aux=True
  )(params, perturbations)
  return loss, grads, {"intermediates": intermediates, "perturbations": deltas}


def value_and_exact_grad(model: FlowMLP, params: PyTree, x: jax.Array) -> tuple[jax.Array, PyTree]:
  """Batch-mean exact NLL −log p(x) and its Euclidean gradient, autodiff through `slogdet`."""
  _check_batch(model, x)
  return jax.value_and_grad(
      lambda p: -jnp.mean(model.apply({"params": p}, x, method=FlowMLP.log_prob))
  )(params)
