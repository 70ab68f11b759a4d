"""FlowMLP: exact log-likelihood against a brute-force Jacobian, inverse, sampling, transforms."""

import warnings

from flax.training import train_state
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import flax_relgrad as fr
from conftest import random_flow_params


@pytest.mark.parametrize("num_layers", [1, 2, 3])
@pytest.mark.parametrize("use_bias", [True, False])
def test_log_prob_matches_jacfwd_brute_force(float64, num_layers, use_bias):
  model = fr.FlowMLP(num_layers, fr.SmoothLeakyReLU(0.2), use_bias, param_dtype=jnp.float64)
  params = random_flow_params(model, width=5, seed=num_layers)
  x = 2.0 * jax.random.normal(jax.random.PRNGKey(7), (9, 5))
  forward = lambda v: model.apply({"params": params}, v)
  jacobians = jax.vmap(jax.jacfwd(forward))(x)  # (B, D, D): ∂z_i/∂x_j per example
  expected = fr.standard_normal_log_prob(forward(x)) + jnp.linalg.slogdet(jacobians)[1]
  log_prob = model.apply({"params": params}, x, method=fr.FlowMLP.log_prob)
  np.testing.assert_allclose(log_prob, expected, rtol=1e-10, atol=0)
  z, log_det = model.apply({"params": params}, x, method=fr.FlowMLP.forward_and_log_det)
  np.testing.assert_allclose(log_det, jnp.linalg.slogdet(jacobians)[1], rtol=1e-10, atol=1e-12)
  np.testing.assert_allclose(z, forward(x), rtol=0, atol=0)


def ill_conditioned_params(model, width, seed, condition):
  """Kernels U diag(s) Vᵀ with singular values spread over [1/condition, 1], biases ~ N(0, 1)."""
  params = model.init(jax.random.PRNGKey(seed), jnp.zeros((1, width)))["params"]
  keys = iter(jax.random.split(jax.random.PRNGKey(seed + 100), 3 * model.num_layers))
  singular_values = jnp.logspace(0, -np.log10(condition), width)
  for name in params:
    u = jnp.linalg.qr(jax.random.normal(next(keys), (width, width)))[0]
    v = jnp.linalg.qr(jax.random.normal(next(keys), (width, width)))[0]
    params[name]["kernel"] = (u * singular_values) @ v.T
    params[name]["bias"] = jax.random.normal(next(keys), (width,))
  return params


def forward_and_inverse(model, params, x):
  z = model.apply({"params": params}, x)
  recovered = jax.jit(lambda z: model.apply({"params": params}, z, method=fr.FlowMLP.inverse))(z)
  return z, recovered


@pytest.mark.parametrize("alpha", [0.01, 0.3])
@pytest.mark.parametrize("num_layers", [1, 2, 3])
def test_inverse_is_backward_stable_float32(alpha, num_layers):
  """g(g⁻¹(z)) = z to float32 rounding, even where g⁻¹ itself is badly conditioned."""
  model = fr.FlowMLP(num_layers, fr.SmoothLeakyReLU(alpha))
  params = ill_conditioned_params(model, width=16, seed=num_layers, condition=100.0)
  x = jax.random.normal(jax.random.PRNGKey(3), (64, 16))
  z, recovered = forward_and_inverse(model, params, x)
  assert recovered.dtype == jnp.float32
  residual = jnp.abs(model.apply({"params": params}, recovered) - z) / (1 + jnp.abs(z))
  assert float(jnp.max(residual)) < 1e-6


@pytest.mark.parametrize("alpha", [0.01, 0.3])
@pytest.mark.parametrize("num_layers", [1, 2, 3])
def test_inverse_round_trip_float32_within_condition_bound(alpha, num_layers):
  """|x̂ − x| ≤ eps·κ·(1 + |x|), κ = Π κ(W_k) · (1/α)^(L−1) the flow's condition bound.

  The kernels' condition numbers multiply to 1e2, so a single layer must be exact to
  ~1e-5; with activations in between, σ⁻¹'s slope up to 1/α amplifies float32 rounding
  of z by up to 1/α per layer, which no inverse can avoid (the backward error above is
  at rounding level).
  """
  model = fr.FlowMLP(num_layers, fr.SmoothLeakyReLU(alpha))
  condition_per_layer = 100.0 ** (1.0 / num_layers)
  params = ill_conditioned_params(model, width=16, seed=num_layers, condition=condition_per_layer)
  x = jax.random.normal(jax.random.PRNGKey(3), (64, 16))
  _, recovered = forward_and_inverse(model, params, x)
  condition = 100.0 * (1.0 / alpha) ** (num_layers - 1)
  error = jnp.abs(recovered - x) / (1 + jnp.abs(x))
  assert float(jnp.max(error)) <= np.finfo(np.float32).eps * condition
  if num_layers == 1:
    assert float(jnp.max(error)) < 1e-5


def test_sample_shape_dtype_and_finite():
  model = fr.FlowMLP(2)
  params = ill_conditioned_params(model, width=12, seed=0, condition=3.0)
  samples = model.apply({"params": params}, jax.random.PRNGKey(1), 33, method=fr.FlowMLP.sample)
  assert samples.shape == (33, 12) and samples.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(samples)))
  # Samples are the inverse of standard normal draws: mapping them forward gives N(0, I) back.
  z = model.apply({"params": params}, samples)
  np.testing.assert_allclose(
    z, jax.random.normal(jax.random.PRNGKey(1), (33, 12)), rtol=1e-4, atol=1e-4
  )


def test_jit_grad_vmap_compatible(float64):
  model = fr.FlowMLP(2, param_dtype=jnp.float64)
  params = random_flow_params(model, width=4, seed=0)
  x = jax.random.normal(jax.random.PRNGKey(1), (6, 4))
  log_prob = lambda p, x: model.apply({"params": p}, x, method=fr.FlowMLP.log_prob)
  batched = jax.jit(log_prob)(params, x)
  per_example = jax.vmap(log_prob, in_axes=(None, 0))(params, x)
  np.testing.assert_allclose(batched, per_example, rtol=1e-13)
  grads = jax.grad(lambda p: log_prob(p, x).sum())(params)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree_util.tree_leaves(grads))


def test_orthogonal_default_and_near_identity_init():
  x = jnp.zeros((2, 6))
  kernel = fr.FlowMLP(1).init(jax.random.PRNGKey(0), x)["params"]["layers_0"]["kernel"]
  np.testing.assert_allclose(kernel @ kernel.T, jnp.eye(6), atol=1e-5)
  model = fr.FlowMLP(1, kernel_init=fr.near_identity(0.01))
  kernel = model.init(jax.random.PRNGKey(0), x)["params"]["layers_0"]["kernel"]
  assert 0 < float(jnp.max(jnp.abs(kernel - jnp.eye(6)))) < 0.1


def test_bad_inputs_raise_clear_errors():
  with pytest.raises(ValueError, match="num_layers >= 1"):
    fr.FlowMLP(0).init(jax.random.PRNGKey(0), jnp.zeros((1, 3)))
  with pytest.raises(ValueError, match=r"shape \(\.\.\., D\)"):
    fr.FlowMLP(2).init(jax.random.PRNGKey(0), jnp.zeros(()))
  with pytest.raises(ValueError, match="square kernels"):
    fr.near_identity()(jax.random.PRNGKey(0), (3, 4))
  for flow, args in (
    (fr.FlowMLP(2, jnp.tanh), ()),
    (fr.ConditionalFlowMLP(2, activation=jnp.tanh), (jnp.ones((1, 2)),)),
  ):
    with pytest.raises(ValueError, match="activation must be an Activation"):
      flow.init(jax.random.PRNGKey(0), jnp.zeros((1, 3)), *args)


def test_wrong_dtypes_widths_and_sample_shapes_raise_clear_errors():
  """Integer inputs (a spline before the first layer would cast its output back to int and
  give a wrong density), latents or layer outputs of another width, and sample shapes that
  are not positive ints; NumPy and JAX integer scalars are ints."""
  model = fr.FlowMLP(num_layers=2, spline_bins=3)
  variables = model.init(jax.random.PRNGKey(0), jnp.ones((2, 3)))
  with pytest.raises(ValueError, match="floating-point inputs, got dtype int32"):
    model.apply(variables, jnp.ones((2, 3), jnp.int32), method="log_prob")
  with pytest.raises(ValueError, match=r"D = 3 \(3×3 kernels\) but got latents of shape \(2, 5\)"):
    model.apply(variables, jnp.ones((2, 5)), method="base_log_prob")
  layer = fr.FlowDense()
  layer_variables = layer.init(jax.random.PRNGKey(0), jnp.ones((1, 3)))
  with pytest.raises(ValueError, match=r"outputs y of shape \(2, 1\)"):
    layer.apply(layer_variables, jnp.ones((2, 1)), method="inverse")
  with pytest.raises(ValueError, match=r"pre-activations \(6, 2\)"):
    fr.relative_layer_update(jnp.eye(3), None, jnp.ones((6, 2)), jnp.ones((6, 2)))
  with pytest.raises(ValueError, match="δ must have the pre-activations' shape"):
    fr.relative_layer_update(jnp.eye(3), None, jnp.ones((6, 3)), jnp.ones((3, 3)))
  rng = jax.random.PRNGKey(1)
  for bad in (0, True, (2, 0), 2.0, jnp.ones(2, int)):
    with pytest.raises(ValueError, match="sample_shape must be an int or a tuple of ints >= 1"):
      model.apply(variables, rng, bad, method="sample")
  assert model.apply(variables, rng, np.int64(4), method="sample").shape == (4, 3)
  assert model.apply(variables, rng, (jnp.int32(2), 5), method="sample").shape == (2, 5, 3)
  with warnings.catch_warnings():  # NumPy float64 with x64 off: converted, no JAX warning
    warnings.filterwarnings("error", message="Explicitly requested dtype")
    assert model.apply(variables, np.ones((2, 3)), method="log_prob").dtype == jnp.float32


def test_bfloat16_params_init_train_log_prob_and_sample():
  """LAPACK has no bfloat16 QR/LU on CPU: factorisations run in float32, results come back.
  (Splines with bfloat16 params: test_splines.py.)"""
  model = fr.FlowMLP(2, fr.SmoothLeakyReLU(0.3), param_dtype=jnp.bfloat16)
  x = jax.random.normal(jax.random.PRNGKey(0), (64, 8)) * jnp.arange(1.0, 9.0)
  params = model.init(jax.random.PRNGKey(1), x)["params"]
  assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(params)} == {jnp.dtype(jnp.bfloat16)}
  log_prob = lambda p: float(model.apply({"params": p}, x, method=fr.FlowMLP.log_prob).mean())
  start = log_prob(params)
  assert np.isfinite(fr.value_and_exact_grad(model, params, x)[0])
  state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=optax.adam(1e-2))

  @jax.jit
  def step(state):
    _, grads = fr.value_and_relative_grad(model, fr.nll)(state.params, x)
    return state.apply_gradients(grads=grads)

  for _ in range(100):
    state = step(state)
  assert log_prob(state.params) > start + 10
  samples = model.apply(
    {"params": state.params}, jax.random.PRNGKey(2), 5, method=fr.FlowMLP.sample
  )
  assert (
    samples.shape == (5, 8)
    and samples.dtype == jnp.bfloat16
    and bool(jnp.all(jnp.isfinite(samples)))
  )


def test_plain_apply_with_every_collection_mutable_keeps_the_exact_log_det(float64):
  """`apply(..., mutable=True)` is not the relative-gradient pass: it returns the sown
  pre-activations but no `perturbations`, and variables merged with what it returned (or
  holding a `perturbations` collection from anywhere) still give the exact log p, whose
  log|det W| terms are not replaced by placeholders, and still sample."""
  model = fr.FlowMLP(num_layers=2, spline_bins=3)
  params = random_flow_params(model, 3, seed=0)
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 3))
  exact = model.apply({"params": params}, x, method="log_prob")
  log_prob, state = model.apply({"params": params}, x, method="log_prob", mutable=True)
  assert sorted(state) == ["intermediates", "params"]
  assert len(state["intermediates"]["layers_0"][fr.PREACTIVATION]) == 1
  np.testing.assert_array_equal(log_prob, exact)
  stale = {"layers_0": {fr.LOG_ABS_DET: 0.0}, "layers_1": {fr.LOG_ABS_DET: 0.0}}
  for variables in ({**state, "params": params}, {"params": params, "perturbations": stale}):
    np.testing.assert_array_equal(model.apply(variables, x, method="log_prob"), exact)
    assert model.apply(variables, jax.random.PRNGKey(2), 5, method="sample").shape == (5, 3)
