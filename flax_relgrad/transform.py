"""`relative_jacobian()`: the relative gradient as an Optax `GradientTransformation`.

For users who keep the gradient computation in their own hands (their own step, a chain
where their preconditioners live): first in a chain, it turns the Euclidean gradient of a
relative-gradient pass into the exact relative one, with the maths `value_and_relative_grad`
uses (`flax_relgrad.relative`)::

    tx = optax.chain(fr.relative_jacobian(), optax.adam(1e-3))
    grad_fn = fr.value_grad_and_relative_args(model, fr.nll)
    loss, grads, relative_args = grad_fn(params, x)
    updates, opt_state = tx.update(grads, opt_state, params, relative_args=relative_args)

Safety. The rewrite builds each flow layer's update from the y, δ, λ and direct gradients in
`relative_args`, not from the incoming gradient leaf, so anything done to the gradient before
it would be lost. The transform therefore checks, at run time, that the gradient it receives
is the one `relative_args` were made with (each flow leaf equal to the layer's own gradient
plus the direct one, within rounding; the params by the inner product ⟨zᵀδ, W⟩ = Σ (y − b)·δ),
and raises otherwise: gradients scaled, clipped, decayed, accumulated (`optax.MultiSteps`
around it) or averaged across devices before it, another transform before it in the chain,
`relative_args` from another batch, or other params (a `ValueError`; under `jax.jit`, where
XLA runs the check in a callback, a `jax.errors.JaxRuntimeError` with the same message).
Missing, foreign or empty `relative_args` and missing `params` raise at once. All of these
name the fix: put `relative_jacobian()` first, directly on the gradients of
`value_grad_and_relative_args`, and scale, clip, accumulate or average after it (the relative
gradient is linear in the Euclidean one, so that stays exact).
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from flax_relgrad.relative import RelativeArgs
from flax_relgrad.relative import checked_relative_gradients

MISSING_ARGS = (
  "relative_jacobian() needs relative_args: call tx.update(grads, opt_state, params, "
  "relative_args=relative_args) with the three outputs of fr.value_grad_and_relative_args "
  "(value, grads, relative_args). Flax's TrainState.apply_gradients cannot pass them: use "
  "fr.value_and_relative_grad and a plain optimizer there (its grads are already relative). "
  "If you pass them, a wrapper around relative_jacobian() dropped them (older optax.MultiSteps "
  "does): put it outside, optax.chain(fr.relative_jacobian(), optax.MultiSteps(...))."
)

MISMATCH = (
  "relative_jacobian() received gradients that differ from those its relative_args were "
  "made with. It must come first in the chain, directly on the grads of "
  "fr.value_grad_and_relative_args from the same call, with the params they were taken at "
  "(same batch, same params). Scale, clip, decay weights (optax.add_decayed_weights, also "
  "masked to kernels), accumulate (optax.MultiSteps) or average across devices after it: "
  "optax.chain(fr.relative_jacobian(), optax.clip_by_global_norm(1.0), optax.adam(1e-3))."
)


def relative_jacobian() -> optax.GradientTransformationExtraArgs:
  """The Optax transform that makes every flow layer's gradient its exact relative gradient.

  `update(grads, state, params, *, relative_args)` replaces the kernel and bias leaves of
  every flow layer by ΔW = Ŵ Ŵᵀ Ĝ restricted to W and b (Ŵ = [[W, 0], [b, 1]], Ĝ the
  Euclidean gradient with every log|det W| term: its λ W⁻ᵀ becomes λ W, −W for the batch
  mean of −log p), computed in O(B·D²) from the layer's y, δ and λ, plus the Ŵ Ŵᵀ Ĝ term
  of what the loss does with W and b besides the layer (a penalty on W:
  `relative_args.direct_grads`, O(D³) and only when non-zero); other leaves pass through.
  `grads` and `relative_args` must be the outputs of one `fr.value_grad_and_relative_args`
  (or `flax_relgrad.nnx.value_grad_and_relative_args`) call at `params`; anything else
  raises (see the module docstring). The result equals `fr.value_and_relative_grad`'s grads.

  Returns:
    An `optax.GradientTransformationExtraArgs` with an empty state.
  """

  def init_fn(params: Any) -> optax.EmptyState:
    del params
    return optax.EmptyState()

  def update_fn(
    updates: Any,
    state: optax.EmptyState,
    params: Any = None,
    *,
    relative_args: RelativeArgs | None = None,
    **extra_args: Any,
  ) -> tuple[Any, optax.EmptyState]:
    del extra_args  # meant for other transforms of the chain
    if relative_args is None:
      raise ValueError(MISSING_ARGS)
    if params is None:
      raise ValueError(
        "relative_jacobian() needs params: tx.update(grads, opt_state, params, relative_args=...)."
      )
    relative, mismatch = checked_relative_gradients(params, updates, relative_args)
    jax.debug.callback(_raise_if_mismatch, mismatch)
    return relative, state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _raise_if_mismatch(mismatch: Any) -> None:
  if bool(mismatch):
    raise ValueError(MISMATCH)
