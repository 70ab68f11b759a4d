"""The relative gradient of a FlowMLP against the brute-force augmented-matrix Ŵ Ŵᵀ Ĝ, and
the errors that misuse gets."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import flax_relgrad as fr
from conftest import brute_force_relative_gradient
from conftest import perturbed_init
from conftest import random_flow_params


def relative_updates(model, params, x):
  return fr.value_and_relative_grad(model, fr.nll)(params, x)[1]


def max_relative_error(actual, expected):
  return float(jnp.max(jnp.abs(actual - expected)) / jnp.max(jnp.abs(expected)))


@pytest.mark.parametrize("num_layers", [1, 2, 3])
@pytest.mark.parametrize("width", [3, 8])
@pytest.mark.parametrize("batch", [1, 5, 17])
@pytest.mark.parametrize("use_bias", [True, False])
def test_matches_brute_force_augmented_relative_gradient(
  float64, num_layers, width, batch, use_bias
):
  model = fr.FlowMLP(num_layers, fr.SmoothLeakyReLU(0.1), use_bias, param_dtype=jnp.float64)
  params = random_flow_params(model, width, seed=10 * num_layers + width)  # init batch is 2
  x = 1.5 * jax.random.normal(jax.random.PRNGKey(batch), (batch, width))
  updates = relative_updates(model, params, x)
  _, exact_grads = fr.value_and_exact_grad(model, params, x)  # autodiff incl. slogdet
  for layer, layer_params in params.items():
    expected_kernel, expected_bias = brute_force_relative_gradient(
      layer_params["kernel"],
      layer_params.get("bias"),
      exact_grads[layer]["kernel"],
      exact_grads[layer].get("bias"),
    )
    assert max_relative_error(updates[layer]["kernel"], expected_kernel) < 1e-10
    if use_bias:
      assert max_relative_error(updates[layer]["bias"], expected_bias) < 1e-10
    else:
      assert set(updates[layer]) == {"kernel"}


def dot_operand_shapes(fn, *args):
  jaxpr = jax.make_jaxpr(fn)(*args)
  return [
    tuple(v.aval.shape for v in eqn.invars)
    for eqn in jaxpr.eqns
    if eqn.primitive.name == "dot_general"
  ]


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


def test_flow_as_submodule_and_other_leaves_are_ordinary_gradients():
  model = FlowWithScale()
  x = jax.random.normal(jax.random.PRNGKey(0), (5, 3))
  params = perturbed_init(model, x, seed=1)  # W Wᵀ ≠ I
  _, grads = fr.value_and_relative_grad(model, FlowWithScale.__call__)(params, x)
  plain = jax.grad(lambda p: model.apply({"params": p}, x))(params)
  np.testing.assert_allclose(grads["scale"], plain["scale"], rtol=1e-6)
  assert not np.allclose(grads["flow"]["layers_0"]["kernel"], plain["flow"]["layers_0"]["kernel"])


def test_chains_with_adam_under_jit_and_reduces_exact_nll():
  model = fr.FlowMLP(2, fr.SmoothLeakyReLU(0.3))
  x = jax.random.normal(jax.random.PRNGKey(0), (32, 4)) @ jnp.array(
    [[2.0, 0, 0, 0], [1, 0.5, 0, 0], [0, 0, 1, 0], [0, 0, 3, 1]]
  )
  params = model.init(jax.random.PRNGKey(1), x[:1])["params"]  # init batch ≠ training batch
  tx = optax.adam(1e-2)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state):
    _, grads = fr.value_and_relative_grad(model, fr.nll)(params, x)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  exact_nll = lambda p: fr.value_and_exact_grad(model, p, x)[0]
  start = exact_nll(params)
  for _ in range(50):
    params, opt_state = step(params, opt_state)
  assert exact_nll(params) < start - 1.0


def test_gradient_transformations_commute_with_the_relative_gradient(float64):
  """Each flow leaf is linear in Ĝ: scaling the loss scales it, and the mean over two batches
  (MultiSteps, pmean over shards) is the relative gradient of the mean loss."""
  model = fr.FlowMLP(2, param_dtype=jnp.float64)
  params = random_flow_params(model, 3, seed=0)
  first = jax.random.normal(jax.random.PRNGKey(1), (5, 3))
  second = 2.0 * jax.random.normal(jax.random.PRNGKey(2), (5, 3))
  grad_fn = fr.value_and_relative_grad(model, fr.nll)
  both = grad_fn(params, jnp.concatenate([first, second]))[1]
  mean = jax.tree_util.tree_map(
    lambda a, b: (a + b) / 2, grad_fn(params, first)[1], grad_fn(params, second)[1]
  )
  scaled = fr.value_and_relative_grad(model, lambda m, x: 1024.0 * fr.nll(m, x))(params, first)[1]
  for a, b in zip(jax.tree_util.tree_leaves(mean), jax.tree_util.tree_leaves(both), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-12)
  for a, b in zip(
    jax.tree_util.tree_leaves(scaled),
    jax.tree_util.tree_leaves(grad_fn(params, first)[1]),
    strict=True,
  ):
    np.testing.assert_allclose(a, 1024.0 * b, rtol=1e-12)


def test_init_returns_params_only():
  """No bookkeeping collections come out of init, so none can be reused for another batch."""
  assert set(fr.FlowMLP(2).init(jax.random.PRNGKey(0), jnp.ones((1, 3)))) == {"params"}


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
  with pytest.raises(
    ValueError, match=r"flow layer 'custom' has params \['Dense_0'\] beside kernel and bias"
  ):
    fr.value_and_relative_grad(model, Model.__call__)(params, x, c)


class WideLayer(fr.FlowDense):
  """A home-made layer with a non-square kernel, which cannot be a flow layer."""

  @nn.compact
  def __call__(self, z):
    return self._track_preactivation(
      z @ self.param("kernel", nn.initializers.ones, (z.shape[-1], 4))
    )


def test_non_square_kernel_is_refused_naming_the_layer():
  model, x = WideLayer(name="wide"), jnp.ones((4, 3))
  params = model.init(jax.random.PRNGKey(0), x)["params"]
  loss = lambda m, x: -jnp.mean(fr.standard_normal_log_prob(m(x)))
  with pytest.raises(ValueError, match=r"'<root>' has a kernel of shape \(3, 4\)"):
    fr.value_and_relative_grad(model, loss, require_log_det=False)(params, x)


def test_loss_without_the_log_det_is_refused_unless_allowed():
  model = fr.FlowMLP(2)
  x = jnp.ones((4, 3))
  params = model.init(jax.random.PRNGKey(0), x)["params"]
  partial = lambda m, x: -jnp.mean(fr.standard_normal_log_prob(m(x)))
  with pytest.raises(
    ValueError, match="applies flow layer 'layers_0' but never uses its log\\|det W\\|"
  ):
    fr.value_and_relative_grad(model, partial)(params, x)
  fr.value_and_relative_grad(model, partial, require_log_det=False)(params, x)  # λ = 0


def test_loss_without_flow_layers_and_non_scalar_loss_raise():
  model = nn.Dense(3)
  params = model.init(jax.random.PRNGKey(0), jnp.ones((2, 3)))["params"]
  with pytest.raises(ValueError, match="the loss applies no flow layer"):
    fr.value_and_relative_grad(model, lambda m, x: m(x).sum())(params, jnp.ones((2, 3)))
  with pytest.raises(ValueError, match="has no log_prob method"):
    fr.value_and_relative_grad(model, fr.nll)(params, jnp.ones((2, 3)))
  flow = fr.FlowMLP(2)
  params = flow.init(jax.random.PRNGKey(0), jnp.ones((2, 3)))["params"]
  with pytest.raises(ValueError, match=r"must return a scalar loss, got shape \(2,\)"):
    fr.value_and_relative_grad(flow, "log_prob")(params, jnp.ones((2, 3)))


def test_vmap_without_collection_axes_is_refused_naming_the_cause():
  ensemble = nn.vmap(
    fr.FlowMLP,
    variable_axes={"params": 0},
    split_rngs={"params": True},
    in_axes=None,
    axis_size=2,
    methods=["log_prob"],
  )(2)
  x = jnp.ones((4, 3))
  params = ensemble.init(jax.random.PRNGKey(0), x, method="log_prob")["params"]
  with pytest.raises(
    ValueError, match="inside nn.vmap or nn.scan, list 'intermediates' and 'perturbations'"
  ):
    fr.value_and_relative_grad(ensemble, fr.nll)(params, x)


def test_bad_batches_raise():
  model = fr.FlowMLP(2)
  params = model.init(jax.random.PRNGKey(0), jnp.ones((1, 4)))["params"]
  with pytest.raises(ValueError, match=r"empty inputs of shape \(0, 4\)"):
    fr.value_and_relative_grad(model, fr.nll)(params, jnp.ones((0, 4)))
  with pytest.raises(ValueError, match=r"shape \(\.\.\., D\)"):
    fr.value_and_relative_grad(model, fr.nll)(params, jnp.ones(()))
  layer = fr.FlowDense()  # a bare layer has no input check: the relative pass refuses
  layer_params = layer.init(jax.random.PRNGKey(0), jnp.ones((1, 4)))["params"]
  with pytest.raises(ValueError, match=r"flow layer '<root>' was applied to an empty batch"):
    fr.value_and_relative_grad(layer, lambda m, x: -m.forward_and_log_det(x)[1].sum())(
      layer_params, jnp.ones((0, 4))
    )
  conditional = fr.ConditionalFlowMLP(2)
  params = conditional.init(jax.random.PRNGKey(0), jnp.ones((3, 4)), jnp.ones((3, 2)))["params"]
  with pytest.raises(ValueError, match=r"context of shape \(5, 'C'\).*got \(3, 2\)"):
    fr.value_and_relative_grad(conditional, fr.nll)(params, jnp.ones((5, 4)), jnp.ones((3, 2)))


def test_loss_through_the_inverse_is_refused():
  """Reverse KL through `inverse` depends on W other than through y and log|det W|."""
  model = fr.FlowMLP(1)
  eps = jnp.ones((4, 3))
  params = model.init(jax.random.PRNGKey(0), eps)["params"]
  reverse_kl = lambda m, e: jnp.mean(
    m.log_prob(m.inverse(e)) + 0.5 * jnp.sum(m.inverse(e) ** 2, -1)
  )
  with pytest.raises(
    ValueError, match="flow layer 'layers_0': the loss runs a flow layer backwards"
  ):
    fr.value_and_relative_grad(model, reverse_kl)(params, eps)
