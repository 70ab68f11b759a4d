"""`TrainState`: Flax's train state with an `apply_gradients` that forwards optax's extra args."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import optax
from flax.training import train_state

from flax_relgrad.transform import RelativeJacobianState


class TrainState(train_state.TrainState):
  """`flax.training.train_state.TrainState` whose `apply_gradients` reaches `tx.update`'s
  extra args, so that `relative_jacobian()` gets what it needs::

      loss, grads, extra = grad_fn(state.params, x)
      state = state.apply_gradients(grads=grads, **extra)

  Keyword args that name a field of the state are `replace`d, as in Flax; all others go to
  `tx.update`. Passing extra args to an optimizer without `relative_jacobian()` raises a
  `ValueError` (the flow layers would train on placeholder gradients).
  """

  def apply_gradients(self, *, grads: Any, **kwargs: Any) -> "TrainState":
    fields = {field.name for field in dataclasses.fields(self)}
    replacements = {name: value for name, value in kwargs.items() if name in fields}
    extra_args = {name: value for name, value in kwargs.items() if name not in fields}
    if extra_args and not _contains_relative_jacobian(self.opt_state):
      raise ValueError(
          f"TrainState.apply_gradients got extra args {sorted(extra_args)} but the optimizer "
          "has no relative_jacobian(); use tx=optax.chain(flax_relgrad.relative_jacobian(), ...)."
      )
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
