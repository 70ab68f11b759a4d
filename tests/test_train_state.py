"""fr.TrainState forwards extra args to the optimizer, and refuses an optimizer without the
relative transform."""

import jax
import numpy as np
import optax
import pytest

import flax_relgrad as fr


def setup_state(tx):
  model = fr.FlowMLP(2)
  x = jax.random.normal(jax.random.PRNGKey(0), (8, 3))
  params = model.init(jax.random.PRNGKey(1), x)["params"]
  return model, x, fr.TrainState.create(apply_fn=model.apply, params=params, tx=tx)


def test_apply_gradients_equals_manual_update():
  tx = optax.chain(fr.relative_jacobian(), optax.adam(1e-2))
  model, x, state = setup_state(tx)
  _, grads, extra = fr.value_and_relative_grad_args(model, state.params, x)
  other_apply = lambda *args, **kwargs: None
  new_state = state.apply_gradients(grads=grads, **extra, apply_fn=other_apply)
  updates, _ = tx.update(grads, tx.init(state.params), state.params, **extra)
  expected = optax.apply_updates(state.params, updates)
  for a, b in zip(jax.tree_util.tree_leaves(new_state.params), jax.tree_util.tree_leaves(expected)):
    np.testing.assert_array_equal(a, b)
  assert new_state.apply_fn is other_apply and new_state.step == 1  # fields are replaced as in Flax


def test_optimizer_without_relative_jacobian_is_refused():
  model, x, state = setup_state(optax.adam(1e-2))
  _, grads, extra = fr.value_and_relative_grad_args(model, state.params, x)
  with pytest.raises(ValueError, match="the optimizer has no relative_jacobian"):
    state.apply_gradients(grads=grads, **extra)


@pytest.mark.parametrize("tx", [
    optax.chain(optax.clip_by_global_norm(0.1), fr.relative_jacobian(), optax.sgd(1.0)),
    optax.chain(optax.add_decayed_weights(1e-4), fr.relative_jacobian(), optax.adam(1e-3)),
    optax.MultiSteps(optax.chain(fr.relative_jacobian(), optax.sgd(1.0)), every_k_schedule=2),
], ids=["clip_first", "decay_first", "multisteps_around"])
def test_relative_jacobian_not_first_is_refused(tx):
  model, x, state = setup_state(tx)
  _, grads, extra = fr.value_and_relative_grad_args(model, state.params, x)
  with pytest.raises(ValueError, match="relative_jacobian\\(\\) is not the first transformation"):
    state.apply_gradients(grads=grads, **extra)


@pytest.mark.parametrize("tx", [
    optax.inject_hyperparams(lambda learning_rate: optax.chain(fr.relative_jacobian(), optax.adam(learning_rate)))(
        learning_rate=1e-3),
    optax.apply_if_finite(optax.chain(fr.relative_jacobian(), optax.clip_by_global_norm(1.0), optax.sgd(1e-2)), 3),
    optax.chain(fr.relative_jacobian(), optax.MultiSteps(optax.sgd(1e-2), 2).gradient_transformation()),
], ids=["inject_hyperparams", "apply_if_finite", "multisteps_after"])
def test_relative_jacobian_first_inside_transparent_wrappers_is_accepted(tx):
  model, x, state = setup_state(tx)
  _, grads, extra = fr.value_and_relative_grad_args(model, state.params, x)
  assert state.apply_gradients(grads=grads, **extra).step == 1
