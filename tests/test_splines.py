"""RationalQuadraticSpline and FlowMLP(spline_bins=K, spline_placement=...): log-det against
jacfwd, inverse, training."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import flax_relgrad as fr
from flax_relgrad.core.stack import Stack
from flax_relgrad.core.stack import stack_forward
from conftest import jitted
from conftest import perturb_params
from conftest import perturbed_init

F64 = jnp.float64


def spline_and_params(num_bins=5, bound=3.0, seed=0, width=4, scale=1.0):
  spline = fr.RationalQuadraticSpline(num_bins, bound, F64)
  params = spline.init(
    jax.random.PRNGKey(seed), jnp.zeros((1, width), F64), method="forward_and_log_det"
  )
  return spline, perturb_params(params, seed + 1, scale)


def test_identity_at_init_and_outside_the_interval(float64):
  spline = fr.RationalQuadraticSpline(6, 2.0, F64)
  x = jnp.linspace(-5.0, 5.0, 44, dtype=F64).reshape(11, 4)
  params = spline.init(jax.random.PRNGKey(0), x, method="forward_and_log_det")
  y, log_det = spline.apply(params, x, method="forward_and_log_det")
  np.testing.assert_allclose(y, x, atol=1e-14)
  np.testing.assert_allclose(log_det, 0.0, atol=1e-14)
  _, params = spline_and_params(6, 2.0)
  outside = jnp.array([[-5.0, -2.0, 2.0, 7.5]], F64)
  np.testing.assert_array_equal(spline.apply(params, outside), outside)
  np.testing.assert_array_equal(spline.apply(params, outside, method="inverse"), outside)


def test_log_det_matches_jacfwd_and_inverse_round_trips(float64):
  spline, params = spline_and_params()
  x = 2.0 * jax.random.normal(jax.random.PRNGKey(3), (50, 4), F64)  # inside and outside [−3, 3]
  y, log_det = spline.apply(params, x, method="forward_and_log_det")
  jacobians = jax.vmap(jax.jacfwd(lambda v: spline.apply(params, v)))(x)
  np.testing.assert_allclose(log_det, jnp.linalg.slogdet(jacobians)[1], rtol=1e-12, atol=1e-12)
  assert not np.allclose(y, x, atol=1e-3)  # the perturbed spline is far from the identity
  np.testing.assert_allclose(spline.apply(params, y, method="inverse"), x, rtol=0, atol=1e-12)


def test_continuous_with_continuous_derivative_at_every_knot_and_bound(float64):
  spline, params = spline_and_params(num_bins=7, bound=1.0, scale=2.0)
  knots_x, knots_y, derivatives = spline.apply(params, 4, method="knots")  # (D, K + 1) each
  value = lambda x: spline.apply(params, x)
  eps = 1e-12
  knots = knots_x.T  # (K + 1, D): one row of knots per k, evaluated on every coordinate at once
  np.testing.assert_allclose(value(knots - eps), knots_y.T, atol=1e-6)
  np.testing.assert_allclose(value(knots + eps), knots_y.T, atol=1e-6)
  log_slope = lambda x: jnp.log(jax.vmap(jax.grad(lambda row: value(row[None]).sum()))(x))
  np.testing.assert_allclose(log_slope(knots - eps), jnp.log(derivatives.T), atol=1e-5)
  np.testing.assert_allclose(log_slope(knots + eps), jnp.log(derivatives.T), atol=1e-5)
  grid = jnp.broadcast_to(jnp.linspace(-1.5, 1.5, 3001, dtype=F64)[:, None], (3001, 4))
  assert float(jnp.diff(value(grid), axis=0).min()) > 0  # strictly increasing


def test_gradients_match_finite_differences(float64):
  """Gradients with respect to the spline's parameters, as the optimiser sees them."""
  spline, params = spline_and_params()
  x = 2.0 * jax.random.normal(jax.random.PRNGKey(4), (20, 4), F64)

  def loss(p):
    y, log_det = spline.apply(p, x, method="forward_and_log_det")
    return jnp.mean(jnp.sin(y).sum(-1) + log_det)

  grads = jax.grad(loss)(params)
  direction = perturb_params(jax.tree_util.tree_map(jnp.zeros_like, params), 9, 1.0)
  eps = 1e-6
  shifted = lambda s: jax.tree_util.tree_map(lambda p, d: p + s * eps * d, params, direction)
  numeric = (loss(shifted(1)) - loss(shifted(-1))) / (2 * eps)
  analytic = sum(
    jnp.vdot(g, d)
    for g, d in zip(
      jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(direction), strict=True
    )
  )
  np.testing.assert_allclose(analytic, numeric, rtol=1e-7)


def test_written_out_derivative_rule_equals_autodiff_of_the_formula(float64):
  """The spline's hand-written JVP (used forward and, transposed, backward) against autodiff
  of the plain formula, for each of its seven inputs, on random bins and points."""
  from flax_relgrad.core import splines  # pylint: disable=import-outside-toplevel

  keys = jax.random.split(jax.random.PRNGKey(5), 4)
  shape = (30, 4)
  x_k = jax.random.normal(keys[0], shape, F64)
  w, h = jnp.exp(0.5 * jax.random.normal(keys[1], (2,) + shape, F64))
  y_k = jax.random.normal(keys[2], shape, F64)
  d_k, d_k1 = jnp.exp(jax.random.normal(keys[3], (2,) + shape, F64))
  t = x_k + w * jax.random.uniform(jax.random.PRNGKey(6), shape, F64)
  primals = (t, x_k, w, y_k, h, d_k, d_k1)
  formula = lambda *args: splines._rational_quadratic_terms(*args)[:2]  # pylint: disable=protected-access
  for index in range(len(primals)):
    tangents = tuple(
      jax.random.normal(jax.random.PRNGKey(10 + index), shape, F64)
      if i == index
      else jnp.zeros(shape, F64)
      for i in range(len(primals))
    )
    rule = jax.jvp(splines._rational_quadratic, primals, tangents)  # pylint: disable=protected-access
    reference = jax.jvp(formula, primals, tangents)
    for got, expected in zip(
      jax.tree_util.tree_leaves(rule), jax.tree_util.tree_leaves(reference), strict=True
    ):
      np.testing.assert_allclose(got, expected, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize(
  "placement, splines", [("every_layer", ["splines_0", "splines_1"]), ("input", ["splines_0"])]
)
def test_flow_with_splines_log_prob_inverse_and_sampling(float64, placement, splines):
  model = fr.FlowMLP(
    2,
    fr.SmoothLeakyReLU(0.3),
    param_dtype=F64,
    spline_bins=4,
    spline_bound=2.0,
    spline_placement=placement,
  )
  x = 1.5 * jax.random.normal(jax.random.PRNGKey(5), (9, 5), F64)
  params = perturbed_init(model, x, seed=0)
  assert sorted(params) == ["layers_0", "layers_1", *splines]
  apply = jitted(model, params)
  _, terms = apply("forward_and_layer_terms", x)
  assert [bool(jnp.any(t.spline_log_det != 0)) for t in terms] == [True, placement != "input"]
  jacobians = jax.vmap(jax.jacfwd(lambda v: apply("__call__", v)))(x)
  z, log_det = apply("forward_and_log_det", x)
  np.testing.assert_allclose(log_det, jnp.linalg.slogdet(jacobians)[1], rtol=1e-10)
  np.testing.assert_allclose(
    apply("log_prob", x), fr.standard_normal_log_prob(z) + log_det, rtol=1e-12
  )
  x_again, inverse_log_det = apply("inverse_and_log_det", z)
  np.testing.assert_allclose(x_again, x, atol=1e-10)
  np.testing.assert_allclose(inverse_log_det, -log_det, rtol=1e-10)
  samples, log_p = apply("sample_and_log_prob", jax.random.PRNGKey(2), 6)
  np.testing.assert_allclose(log_p, apply("log_prob", samples), rtol=1e-10)


def test_splines_learn_a_skewed_marginal():
  """Relative-gradient training with splines fits an elementwise skewed density that the
  spline-free flow of the same depth cannot: held-out NLL at least 0.1 nats/dim lower."""
  key = jax.random.PRNGKey(0)
  data = jnp.exp(0.8 * jax.random.normal(key, (3000, 3)))  # log-normal marginals
  train, held_out = data[:2500], data[2500:]
  nlls = {}
  for bins in (0, 8):
    model = fr.FlowMLP(1, spline_bins=bins, spline_bound=6.0)
    params = model.init(jax.random.PRNGKey(1), train)["params"]
    tx = optax.adam(1e-2)
    opt_state = tx.init(params)
    step = jax.jit(functools.partial(fr.relative_update, model, tx))
    for epoch in range(30):
      for batch in jnp.split(jax.random.permutation(jax.random.PRNGKey(epoch), train), 25):
        params, opt_state, _ = step(params, opt_state, batch)
    nlls[bins] = float(-model.apply({"params": params}, held_out, method="log_prob").mean()) / 3
  print(f"held-out NLL per dim: no splines {nlls[0]:.3f}, 8 bins {nlls[8]:.3f}")
  assert nlls[8] < nlls[0] - 0.1


@pytest.mark.parametrize(
  "kwargs, message",
  [
    ({"num_bins": 0}, "1 <= num_bins < 1000"),
    ({"num_bins": 1000}, "1 <= num_bins < 1000"),
    ({"bound": 0.0}, "bound > 0"),
  ],
)
def test_bad_settings_raise(kwargs, message):
  with pytest.raises(ValueError, match=message):
    fr.RationalQuadraticSpline(**kwargs).init(jax.random.PRNGKey(0), jnp.zeros((1, 3)))
  with pytest.raises(ValueError, match="spline_bins must be >= 0"):
    fr.FlowMLP(2, spline_bins=-1).init(jax.random.PRNGKey(0), jnp.zeros((1, 3)))
  with pytest.raises(ValueError, match="spline_placement must be one of"):
    fr.FlowMLP(2, spline_bins=4, spline_placement="output").init(
      jax.random.PRNGKey(0), jnp.zeros((1, 3))
    )


def test_spline_placement_without_bins_and_a_stack_with_a_wrong_spline_count():
  """Without bins the placement is ignored; the core refuses a stack whose splines are
  neither one per layer nor one on the input."""
  x = jnp.ones((2, 3))
  params = fr.FlowMLP(2, spline_placement="input").init(jax.random.PRNGKey(0), x)["params"]
  assert sorted(params) == ["layers_0", "layers_1"]
  model = fr.FlowMLP(3, spline_bins=4)
  bound = model.bind(model.init(jax.random.PRNGKey(0), x))
  stack = Stack(bound.layers, bound.activation, bound.splines[:2])
  with pytest.raises(ValueError, match="one spline per layer or one on the input, got 2"):
    stack_forward(stack, x)


def test_bfloat16_params_compute_in_float32():
  """bfloat16 parameters give the float32 spline of the same parameter values, rounded once
  at the end (knots computed in bfloat16 would be off by up to 0.5 on [−100, 100])."""
  bf16, f32 = (
    fr.RationalQuadraticSpline(8, 100.0, jnp.bfloat16),
    fr.RationalQuadraticSpline(8, 100.0),
  )
  x = jnp.linspace(-99.0, 99.0, 199 * 16).reshape(199, 16)
  params = perturb_params(bf16.init(jax.random.PRNGKey(0), x, method="forward_and_log_det"), 1, 1.0)
  x = x.astype(jnp.bfloat16)
  y, log_det = bf16.apply(params, x, method="forward_and_log_det")
  y_expected, log_det_expected = f32.apply(
    params, x.astype(jnp.float32), method="forward_and_log_det"
  )
  assert y.dtype == log_det.dtype == jnp.bfloat16
  np.testing.assert_allclose(y.astype(jnp.float32), y_expected, rtol=2**-8, atol=1e-6)
  np.testing.assert_allclose(log_det.astype(jnp.float32), log_det_expected, rtol=2**-8, atol=0.05)
