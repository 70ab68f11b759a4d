"""relative_jacobian against the brute-force augmented-matrix relative gradient Ŵ Ŵᵀ Ĝ."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import flax_relgrad as fr
from conftest import brute_force_relative_gradient
from conftest import random_flow_params


def relative_updates(model, params, x):
  _, grads, extra = fr.value_and_relative_grad_args(model, params, x)
  tx = fr.relative_jacobian()
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

  def setup(self):
    self.flow = fr.FlowMLP(2)
    self.scale = self.param("scale", nn.initializers.ones, ())

  def __call__(self, x):
    return jnp.mean(jnp.square(self.flow(x) * self.scale)) - self.flow.kernel_log_abs_det()


def test_flow_as_submodule_and_other_leaves_untouched():
  model = FlowWithScale()
  x = jax.random.normal(jax.random.PRNGKey(0), (5, 3))
  params = model.init(jax.random.PRNGKey(1), x)["params"]
  _, grads, extra = fr.value_and_relative_grad(model, FlowWithScale.__call__)(params, x)
  tx = fr.relative_jacobian()
  updates, _ = tx.update(grads, tx.init(params), params, **extra)
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


def test_init_returns_params_only():
  """No bookkeeping collections come out of init, so none can be reused for another batch."""
  assert set(fr.FlowMLP(2).init(jax.random.PRNGKey(0), jnp.ones((1, 3)))) == {"params"}


def test_extra_args_of_another_batch_raise():
  model = fr.FlowMLP(2)
  x = jnp.ones((5, 3))
  params = model.init(jax.random.PRNGKey(0), x[:1])["params"]
  _, grads, extra = fr.value_and_relative_grad_args(model, params, x)
  _, _, other = fr.value_and_relative_grad_args(model, params, x[:2])
  tx = fr.relative_jacobian()
  with pytest.raises(ValueError, match=r"layer 'layers_0' \(call 1\) has pre-activation \(5, 3\) and δ \(2, 3\)"):
    tx.update(grads, tx.init(params), params, intermediates=extra["intermediates"],
              perturbations=other["perturbations"])


@pytest.mark.parametrize("extra", [{"intermediates": {}, "perturbations": {}},
                                   {"intermediates": {"a": 1}, "perturbations": {"b": {"c": 2}}}])
def test_empty_or_foreign_extra_args_raise(extra):
  model = fr.FlowMLP(2)
  params = model.init(jax.random.PRNGKey(0), jnp.ones((1, 3)))["params"]
  tx = fr.relative_jacobian()
  with pytest.raises(ValueError, match="the extra args name no flow layer"):
    tx.update(params, tx.init(params), params, **extra)


def test_non_square_kernel_raises_naming_the_layer():
  model = fr.FlowMLP(2)
  x = jnp.ones((5, 3))
  params = model.init(jax.random.PRNGKey(0), x)["params"]
  _, grads, extra = fr.value_and_relative_grad_args(model, params, x)
  bad = jax.tree_util.tree_map(lambda p: p, params)
  bad["layers_1"]["kernel"] = jnp.ones((3, 4))
  tx = fr.relative_jacobian()
  with pytest.raises(ValueError, match=r"'layers_1' has a kernel of shape \(3, 4\); the relative gradient needs"):
    tx.update(grads, tx.init(params), bad, **extra)


def test_mismatched_structures_raise_naming_the_layer():
  model = fr.FlowMLP(2)
  x = jnp.ones((5, 3))
  params = model.init(jax.random.PRNGKey(0), x)["params"]
  _, grads, extra = fr.value_and_relative_grad_args(model, params, x)
  tx = fr.relative_jacobian()
  with pytest.raises(ValueError, match="layer 'layers_1' is in the extra args but params hold no kernel"):
    tx.update(grads, tx.init(params), {"layers_0": params["layers_0"]}, **extra)
  intermediates = {"layers_0": extra["intermediates"]["layers_0"]}
  with pytest.raises(ValueError, match="layer 'layers_1' has a log-det gradient but no sown pre-activation"):
    tx.update(grads, tx.init(params), params, intermediates=intermediates, perturbations=extra["perturbations"])
  without_log_det = {
      name: {fr.PREACTIVATION: layer[fr.PREACTIVATION]} for name, layer in extra["perturbations"].items()
  }
  with pytest.raises(ValueError, match="layer 'layers_0' has no log\\|det W\\| gradient"):
    tx.update(grads, tx.init(params), params, intermediates=extra["intermediates"], perturbations=without_log_det)
  with pytest.raises(ValueError, match="gradients have no leaf at"):
    tx.update({"layers_0": grads["layers_0"]}, tx.init(params), params, **extra)


class ContextInsideTheLayer(fr.FlowDense):
  """The trap: a home-made layer whose sown pre-activation holds a context term b(c)."""

  @nn.compact
  def __call__(self, z, c):
    kernel = self.param("kernel", nn.initializers.orthogonal(), (z.shape[-1],) * 2)
    return self._track_preactivation(z @ kernel + nn.Dense(z.shape[-1])(c))


def test_layer_that_breaks_the_sowing_contract_is_refused():
  class Model(nn.Module):
    @nn.compact
    def __call__(self, x, c):
      layer = ContextInsideTheLayer(name="custom")
      return -jnp.mean(fr.standard_normal_log_prob(layer(x, c)) + layer.log_abs_det())

  model, x, c = Model(), jnp.ones((4, 3)), jnp.ones((4, 2))
  params = model.init(jax.random.PRNGKey(0), x, c)["params"]
  _, grads, extra = fr.value_and_relative_grad(model, Model.__call__)(params, x, c)
  tx = fr.relative_jacobian()
  with pytest.raises(ValueError, match=r"flow layer 'custom' has params \['Dense_0'\] beside kernel and bias"):
    tx.update(grads, tx.init(params), params, **extra)


def test_loss_without_the_log_det_is_refused_unless_allowed():
  model = fr.FlowMLP(2)
  x = jnp.ones((4, 3))
  params = model.init(jax.random.PRNGKey(0), x)["params"]
  partial = lambda m, x: -jnp.mean(fr.standard_normal_log_prob(m(x)))
  with pytest.raises(ValueError, match="applies flow layer 'layers_0' but never uses its log\\|det W\\|"):
    fr.value_and_relative_grad(model, partial)(params, x)
  _, grads, extra = fr.value_and_relative_grad(model, partial, require_log_det=False)(params, x)
  tx = fr.relative_jacobian()
  tx.update(grads, tx.init(params), params, **extra)  # λ = 0: the relative gradient of that loss


def test_loss_without_flow_layers_and_non_scalar_loss_raise():
  model = nn.Dense(3)
  params = model.init(jax.random.PRNGKey(0), jnp.ones((2, 3)))["params"]
  with pytest.raises(ValueError, match="the loss applies no flow layer"):
    fr.value_and_relative_grad(model, lambda m, x: m(x).sum())(params, jnp.ones((2, 3)))
  flow = fr.FlowMLP(2)
  params = flow.init(jax.random.PRNGKey(0), jnp.ones((2, 3)))["params"]
  with pytest.raises(ValueError, match=r"must return a scalar loss, got shape \(2,\)"):
    fr.value_and_relative_grad(flow, "log_prob")(params, jnp.ones((2, 3)))


def test_vmap_without_collection_axes_is_refused_naming_the_cause():
  ensemble = nn.vmap(fr.FlowMLP, variable_axes={"params": 0}, split_rngs={"params": True},
                     in_axes=None, axis_size=2, methods=["log_prob"])(2)
  x = jnp.ones((4, 3))
  params = ensemble.init(jax.random.PRNGKey(0), x, method="log_prob")["params"]
  with pytest.raises(ValueError, match="inside nn.vmap or nn.scan, list 'intermediates' and 'perturbations'"):
    fr.value_and_relative_grad(ensemble, lambda m, x: -m.log_prob(x).mean())(params, x)


def test_bad_batches_raise():
  model = fr.FlowMLP(2)
  params = model.init(jax.random.PRNGKey(0), jnp.ones((1, 4)))["params"]
  with pytest.raises(ValueError, match=r"batch of shape \(B, D\), got \(2, 2, 2\)"):
    fr.value_and_relative_grad_args(model, params, jnp.ones((2, 2, 2)))
  with pytest.raises(ValueError, match=r"empty batch \(0, 4\)"):
    fr.value_and_relative_grad_args(model, params, jnp.ones((0, 4)))
  with pytest.raises(ValueError, match=r"empty inputs of shape \(0, 4\)"):
    fr.value_and_relative_grad(model, lambda m, x: -m.log_prob(x).sum())(params, jnp.ones((0, 4)))
  layer = fr.FlowDense()  # a bare layer has no input check: the relative pass refuses
  layer_params = layer.init(jax.random.PRNGKey(0), jnp.ones((1, 4)))["params"]
  with pytest.raises(ValueError, match=r"flow layer '' was applied to an empty batch"):
    fr.value_and_relative_grad(layer, lambda m, x: -m.forward_and_log_det(x)[1].sum())(layer_params, jnp.ones((0, 4)))
  conditional = fr.ConditionalFlowMLP(2)
  params = conditional.init(jax.random.PRNGKey(0), jnp.ones((3, 4)), jnp.ones((3, 2)))["params"]
  with pytest.raises(ValueError, match=r"context of shape \(5, 'C'\).*got \(3, 2\)"):
    fr.value_and_relative_grad_args(conditional, params, jnp.ones((5, 4)), jnp.ones((3, 2)))
  with pytest.raises(ValueError, match="has no log_prob method"):
    fr.value_and_relative_grad_args(nn.Dense(4), params, jnp.ones((5, 4)))


def test_loss_through_the_inverse_is_refused():
  """Reverse KL through `inverse` depends on W other than through y and log|det W|."""
  model = fr.FlowMLP(1)
  eps = jnp.ones((4, 3))
  params = model.init(jax.random.PRNGKey(0), eps)["params"]
  reverse_kl = lambda m, e: jnp.mean(m.log_prob(m.inverse(e)) + 0.5 * jnp.sum(m.inverse(e) ** 2, -1))
  with pytest.raises(ValueError, match="runs flow layer 'layers_0' backwards"):
    fr.value_and_relative_grad(model, reverse_kl)(params, eps)
