"""relative_jacobian against the brute-force augmented-matrix relative gradient Ŵ Ŵᵀ Ĝ."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import flax_relgrad as fr
from conftest import random_flow_params


def brute_force_relative_gradient(kernel, bias, kernel_grad, bias_grad):
  """Ŵ Ŵᵀ Ĝ restricted to the trainable block, Ŵ = [[W, 0], [b, 1]], Ĝ = [[G_W, 0], [g_b, 0]]."""
  width = kernel.shape[0]
  if bias is None:
    bias, bias_grad = jnp.zeros(width), jnp.zeros(width)
  augmented = jnp.block([[kernel, jnp.zeros((width, 1))], [bias[None], jnp.ones((1, 1))]])
  augmented_grad = jnp.block([[kernel_grad, jnp.zeros((width, 1))], [bias_grad[None], jnp.zeros((1, 1))]])
  relative = augmented @ augmented.T @ augmented_grad
  return relative[:width, :width], relative[width, :width]


def relative_updates(model, params, x, log_det_weight=1.0):
  _, grads, extra = fr.value_and_relative_grad_args(model, params, x)
  tx = fr.relative_jacobian(log_det_weight)
  return tx.update(grads, tx.init(params), params, **extra)[0]


def max_relative_error(actual, expected):
  return float(jnp.max(jnp.abs(actual - expected)) / jnp.max(jnp.abs(expected)))


@pytest.mark.parametrize("num_layers", [1, 2, 3])
@pytest.mark.parametrize("width", [3, 8])
@pytest.mark.parametrize("batch", [1, 5, 17])
@pytest.mark.parametrize("use_bias", [True, False])
def test_matches_brute_force_augmented_relative_gradient(float64, num_layers, width, batch, use_bias):
  model = fr.FlowMLP(num_layers, fr.SmoothLeakyReLU(0.1), use_bias, param_dtype=jnp.float64)
  params = random_flow_params(model, width, seed=10 * num_layers + width)  # init batch is 2
  x = 1.5 * jax.random.normal(jax.random.PRNGKey(batch), (batch, width))
  updates = relative_updates(model, params, x)
  _, exact_grads = fr.value_and_exact_grad(model, params, x)  # autodiff incl. slogdet
  for layer, layer_params in params.items():
    expected_kernel, expected_bias = brute_force_relative_gradient(
        layer_params["kernel"], layer_params.get("bias"),
        exact_grads[layer]["kernel"], exact_grads[layer].get("bias"),
    )
    assert max_relative_error(updates[layer]["kernel"], expected_kernel) < 1e-10
    if use_bias:
      assert max_relative_error(updates[layer]["bias"], expected_bias) < 1e-10
    else:
      assert set(updates[layer]) == {"kernel"}


def test_log_det_weight_scales_the_log_det_term(float64):
  model = fr.FlowMLP(2, param_dtype=jnp.float64)
  params = random_flow_params(model, 4, seed=0)
  x = jax.random.normal(jax.random.PRNGKey(1), (6, 4))
  # A batch-sum loss is B times the batch mean: its relative gradient is B times too.
  _, grads, extra = fr.value_and_relative_grad_args(model, params, x)
  scaled = jax.tree_util.tree_map(lambda g: 6.0 * g, (grads, extra["perturbations"]))
  tx = fr.relative_jacobian(log_det_weight=6.0)
  summed = tx.update(scaled[0], tx.init(params), params,
                     intermediates=extra["intermediates"], perturbations=scaled[1])[0]
  mean = relative_updates(model, params, x)
  for a, b in zip(jax.tree_util.tree_leaves(summed), jax.tree_util.tree_leaves(mean)):
    np.testing.assert_allclose(a, 6.0 * b, rtol=1e-12)


def dot_operand_shapes(fn, *args):
  jaxpr = jax.make_jaxpr(fn)(*args)
  return [tuple(v.aval.shape for v in eqn.invars) for eqn in jaxpr.eqns if eqn.primitive.name == "dot_general"]


@pytest.mark.parametrize("batch, expect_cubic", [(4, False), (64, True)])
def test_matmul_association_follows_static_shapes(batch, expect_cubic):
  width = 16
  kernel, bias = jnp.eye(width), jnp.ones(width)
  y = delta = jnp.ones((batch, width))
  shapes = dot_operand_shapes(fr.relative_layer_update, kernel, bias, y, delta)
  has_cubic = ((width, width), (width, width)) in shapes
  assert has_cubic == expect_cubic, shapes


class FlowWithScale(nn.Module):
  """A user model holding a FlowMLP beside an ordinary parameter."""

  @nn.compact
  def __call__(self, x):
    return fr.FlowMLP(2, name="flow")(x) * self.param("scale", nn.initializers.ones, ())


def test_flow_as_submodule_and_other_leaves_untouched():
  model = FlowWithScale()
  x = jax.random.normal(jax.random.PRNGKey(0), (5, 3))
  params = model.init(jax.random.PRNGKey(1), x)["params"]
  perturbations = fr.zero_perturbations(model, params, x)

  def loss_fn(params, perturbations):
    z, state = model.apply({"params": params, "perturbations": perturbations}, x, mutable=["intermediates"])
    return jnp.mean(jnp.square(z)), state["intermediates"]

  (grads, deltas), intermediates = jax.grad(loss_fn, argnums=(0, 1), has_aux=True)(params, perturbations)
  tx = fr.relative_jacobian()
  updates, _ = tx.update(grads, tx.init(params), params, intermediates=intermediates, perturbations=deltas)
  assert updates["scale"] is grads["scale"]
  assert not np.allclose(updates["flow"]["layers_0"]["kernel"], grads["flow"]["layers_0"]["kernel"])


def test_chains_with_adam_under_jit_and_reduces_exact_nll():
  model = fr.FlowMLP(2, fr.SmoothLeakyReLU(0.3))
  x = jax.random.normal(jax.random.PRNGKey(0), (32, 4)) @ jnp.array(
      [[2.0, 0, 0, 0], [1, 0.5, 0, 0], [0, 0, 1, 0], [0, 0, 3, 1]])
  params = model.init(jax.random.PRNGKey(1), x[:1])["params"]  # init batch ≠ training batch
  tx = optax.chain(fr.relative_jacobian(), optax.adam(1e-2))
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state):
    _, grads, extra = fr.value_and_relative_grad_args(model, params, x)
    updates, opt_state = tx.update(grads, opt_state, params, **extra)
    return optax.apply_updates(params, updates), opt_state

  exact_nll = lambda p: fr.value_and_exact_grad(model, p, x)[0]
  start = exact_nll(params)
  for _ in range(50):
    params, opt_state = step(params, opt_state)
  assert exact_nll(params) < start - 1.0


def test_missing_extra_args_raise():
  tx = fr.relative_jacobian()
  with pytest.raises(ValueError, match="extra args `intermediates` and `perturbations`"):
    tx.update({}, tx.init({}), {})


def test_init_perturbations_of_another_batch_size_raise():
  model = fr.FlowMLP(2)
  x = jnp.ones((5, 3))
  variables = model.init(jax.random.PRNGKey(0), x[:1])
  params = variables["params"]
  _, grads, extra = fr.value_and_relative_grad_args(model, params, x)
  tx = fr.relative_jacobian()
  with pytest.raises(ValueError, match=r"layer 'layers_0' has pre-activation \(5, 3\) and δ \(1, 3\)"):
    tx.update(grads, tx.init(params), params, intermediates=extra["intermediates"],
              perturbations=variables["perturbations"])


def test_non_square_kernel_raises_naming_the_layer():
  model = fr.FlowMLP(2)
  x = jnp.ones((5, 3))
  params = model.init(jax.random.PRNGKey(0), x)["params"]
  _, grads, extra = fr.value_and_relative_grad_args(model, params, x)
  bad = jax.tree_util.tree_map(lambda p: p, params)
  bad["layers_1"]["kernel"] = jnp.ones((3, 4))
  tx = fr.relative_jacobian()
  with pytest.raises(ValueError, match=r"layer 'layers_1' has a non-square kernel of shape \(3, 4\)"):
    tx.update(grads, tx.init(params), bad, **extra)


def test_mismatched_structures_raise_naming_the_layer():
  model = fr.FlowMLP(2)
  x = jnp.ones((5, 3))
  params = model.init(jax.random.PRNGKey(0), x)["params"]
  _, grads, extra = fr.value_and_relative_grad_args(model, params, x)
  tx = fr.relative_jacobian()
  with pytest.raises(ValueError, match="layer 'layers_1' has a perturbation but params hold no kernel"):
    tx.update(grads, tx.init(params), {"layers_0": params["layers_0"]}, **extra)
  intermediates = {"layers_0": extra["intermediates"]["layers_0"]}
  with pytest.raises(ValueError, match="layer 'layers_1' has a perturbation but no sown pre-activation"):
    tx.update(grads, tx.init(params), params, intermediates=intermediates, perturbations=extra["perturbations"])
  with pytest.raises(ValueError, match="gradients have no leaf at"):
    tx.update({"layers_0": grads["layers_0"]}, tx.init(params), params, **extra)


def test_training_batch_must_be_two_dimensional():
  model = fr.FlowMLP(2)
  params = model.init(jax.random.PRNGKey(0), jnp.ones((1, 4)))["params"]
  with pytest.raises(ValueError, match=r"batch of shape \(B, D\), got \(2, 2, 2\)"):
    fr.value_and_relative_grad_args(model, params, jnp.ones((2, 2, 2)))
