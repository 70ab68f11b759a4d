"""`TrainState`: Flax's train state with an `apply_gradients` that forwards optax's extra args."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import optax
from flax.training import train_state

from flax_relgrad.transform import RelativeJacobianState

# Wrappers that hand their inner transformation the gradients unchanged.
_TRANSPARENT_WRAPPERS = (
    optax.InjectHyperparamsState,
    optax.InjectStatefulHyperparamsState,
    optax.ApplyIfFiniteState,
)


class TrainState(train_state.TrainState):
  """`flax.training.train_state.TrainState` whose `apply_gradients` reaches `tx.update`'s
  extra args, so that `relative_jacobian()` gets what it needs:

      loss, grads, extra = grad_fn(state.params, x)
      state = state.apply_gradients(grads=grads, **extra)

  Keyword args that name a field of the state are `replace`d, as in Flax; all others go to
  `tx.update`. With extra args, the optimizer must start with `relative_jacobian()` (wrapped
  at most in `inject_hyperparams` or `apply_if_finite`, or in one branch of
  `multi_transform`); otherwise a `ValueError` says why: transformations before it, or a
  `MultiSteps` around it, would act on the flow layers' placeholder gradients.
  """

  def apply_gradients(self, *, grads: Any, **kwargs: Any) -> "TrainState":
    fields = {field.name for field in dataclasses.fields(self)}
    replacements = {name: value for name, value in kwargs.items() if name in fields}
    extra_args = {name: value for name, value in kwargs.items() if name not in fields}
    if extra_args:
      _check_relative_jacobian_comes_first(self.opt_state, sorted(extra_args))
    updates, opt_state = self.tx.update(grads, self.opt_state, self.params, **extra_args)
    return self.replace(
        step=self.step + 1,
        params=optax.apply_updates(self.params, updates),
        opt_state=opt_state,
        **replacements,
    )


def _contains_relative_jacobian(opt_state: Any) -> bool:
  is_marker = lambda node: isinstance(node, RelativeJacobianState)
  return any(is_marker(node) for node in jax.tree_util.tree_leaves(opt_state, is_leaf=is_marker))


def _starts_with_relative_jacobian(opt_state: Any) -> bool:
  """Whether the transformation with this state passes the gradients to relative_jacobian() first."""
  if isinstance(opt_state, RelativeJacobianState):
    return True
  if isinstance(opt_state, _TRANSPARENT_WRAPPERS):
    return _starts_with_relative_jacobian(opt_state.inner_state)
  if isinstance(opt_state, optax.PartitionState):  # multi_transform: every branch that has it
    branches = [state for state in opt_state.inner_states.values() if _contains_relative_jacobian(state)]
    return bool(branches) and all(_starts_with_relative_jacobian(state) for state in branches)
  if type(opt_state) is tuple:  # noqa: E721 — optax.chain's state; NamedTuple states are not chains.
    return bool(opt_state) and _starts_with_relative_jacobian(opt_state[0])
  return False


def _check_relative_jacobian_comes_first(opt_state: Any, extra_names: list[str]) -> None:
  if not _contains_relative_jacobian(opt_state):
    raise ValueError(
        f"TrainState.apply_gradients got extra args {extra_names} but the optimizer has no "
        "relative_jacobian(); use tx=optax.chain(flax_relgrad.relative_jacobian(), ...)."
    )
  if not _starts_with_relative_jacobian(opt_state):
    raise ValueError(
        "TrainState.apply_gradients: relative_jacobian() is not the first transformation of the "
        "optimizer (or sits inside optax.MultiSteps or masked): what runs before it would act on "
        "the flow layers' placeholder gradients. Use optax.chain(flax_relgrad.relative_jacobian(), "
        "...), with clipping, weight decay or gradient accumulation after it."
    )
