"""Distribution-style methods of the Linen flows against brute force, and their gradients.

`inverse_and_log_det` vs `jacfwd`, `sample_and_log_prob` vs `log_prob` of the samples, any
leading batch shape, the learned base, the input checks, and gradients through sampling
(implicit differentiation of the Newton inverse) against finite differences in float64.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flax_relgrad as fr
from conftest import jitted
from conftest import perturbed_init

F64 = jnp.float64
D = 3


def flow(dtype=jnp.float32, seed=0):
  model = fr.FlowMLP(2, fr.SmoothLeakyReLU(0.2), param_dtype=dtype, base="diagonal_gaussian")
  return model, perturbed_init(model, jnp.zeros((1, D), dtype), seed=seed, scale=0.2)


def conditional(dtype=jnp.float32, seed=0):
  conditioner = nn.Sequential([nn.Dense(5, param_dtype=dtype), nn.tanh])
  model = fr.ConditionalFlowMLP(
    2, conditioner, fr.SmoothLeakyReLU(0.2), param_dtype=dtype, base="diagonal_gaussian"
  )
  context = jnp.zeros((1, 2), dtype)
  return model, perturbed_init(model, jnp.zeros((1, D), dtype), context, seed=seed, scale=0.2)


def test_sample_shapes_and_log_prob_of_samples():
  """float32: log p returned by sample_and_log_prob equals log_prob of the samples."""
  model, params = flow()
  apply = jitted(model, params)
  shape = lambda method, *args: (
    jax.eval_shape(lambda: model.apply({"params": params}, *args, method=method)).shape
  )
  rng = jax.random.PRNGKey(2)
  assert shape("sample", rng) == (D,)
  assert shape("sample", rng, 8) == (8, D)
  x, log_p = apply("sample_and_log_prob", rng, (2, 5))
  assert x.shape == (2, 5, D) and log_p.shape == (2, 5)
  np.testing.assert_allclose(log_p, apply("log_prob", x), rtol=1e-6)
  model, params = conditional()
  c = jax.random.normal(jax.random.PRNGKey(3), (4, 2))
  apply = jitted(model, params)
  assert shape("sample", rng, c) == (4, D)
  x, log_p = apply("sample_and_log_prob", rng, c, 3)
  assert x.shape == (3, 4, D) and log_p.shape == (3, 4)
  np.testing.assert_allclose(log_p, apply("log_prob", x, jnp.broadcast_to(c, (3, 4, 2))), rtol=1e-6)


def test_inverse_and_log_det_against_jacfwd(float64):
  model, params = flow(F64)
  z = jax.random.normal(jax.random.PRNGKey(4), (6, D), F64)
  apply = jitted(model, params)
  x, log_det = apply("inverse_and_log_det", z)
  jacobians = jax.vmap(jax.jacfwd(lambda z: apply("inverse", z)))(z)
  np.testing.assert_allclose(log_det, jnp.linalg.slogdet(jacobians)[1], rtol=1e-12)
  z_again, forward_log_det = apply("forward_and_log_det", x)
  np.testing.assert_allclose(z_again, z, atol=1e-12)
  np.testing.assert_allclose(forward_log_det, -log_det, rtol=1e-12)
  # log p(x) = log N(z; loc, diag(scale²)) + log|det ∂z/∂x|, with the base's params.
  loc, log_scale = params["base_distribution"]["loc"], params["base_distribution"]["log_scale"]
  base = jax.scipy.stats.norm.logpdf(z, loc, jnp.exp(log_scale)).sum(-1)
  np.testing.assert_allclose(apply("log_prob", x), base - log_det, rtol=1e-12)
  model, params = conditional(F64)
  c = jax.random.normal(jax.random.PRNGKey(5), (6, 2), F64)
  apply = jitted(model, params)
  x, log_det = apply("inverse_and_log_det", z, c)
  # The forward log-det is checked against jacfwd in test_conditional.py.
  z_again, forward_log_det = apply("forward_and_log_det", x, c)
  np.testing.assert_allclose(z_again, z, atol=1e-12)
  np.testing.assert_allclose(forward_log_det, -log_det, rtol=1e-12)


def test_any_leading_batch_shape(float64):
  model, params = flow(F64)
  x = jax.random.normal(jax.random.PRNGKey(6), (2, 3, D), F64)
  for method in ("log_prob", "forward_and_log_det", "inverse_and_log_det"):
    batched = jitted(model, params)(method, x)
    flat = jitted(model, params)(method, x.reshape(6, D))
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a.reshape(b.shape), b, rtol=1e-14), batched, flat
    )
  assert model.apply({"params": params}, x[0, 0], method="log_prob").shape == ()


def test_input_errors():
  model, params = flow()
  apply = jitted(model, params)
  with pytest.raises(ValueError, match=r"D = 3 \(3×3 kernels\) but got inputs of shape \(4, 5\)"):
    apply("log_prob", jnp.ones((4, 5)))
  with pytest.raises(ValueError, match=r"D = 3 .* latents of shape \(2\,\)"):
    apply("inverse_and_log_det", jnp.ones((2,)))
  with pytest.raises(ValueError, match=r"empty inputs of shape \(0, 3\)"):
    apply("log_prob", jnp.ones((0, 3)))
  with pytest.raises(ValueError, match="sample_shape must be an int or a tuple"):
    apply("sample", jax.random.PRNGKey(0), 2.5)
  with pytest.raises(
    ValueError, match="flow layer 'layers_1': the loss runs a flow layer backwards"
  ):
    fr.value_and_relative_grad(
      model, lambda m, x: -m.sample_and_log_prob(jax.random.PRNGKey(0), 4)[1].mean()
    )(params, jnp.ones((4, 3)))
  with pytest.raises(ValueError, match="base must be one of"):
    fr.FlowMLP(base="laplace").init(jax.random.PRNGKey(0), jnp.ones((1, 3)))
  model, params = conditional()
  with pytest.raises(ValueError, match=r"D = 3 .* inputs of shape \(4, 2\)"):
    model.apply({"params": params}, jnp.ones((4, 2)), jnp.ones((4, 2)), method="log_prob")


def directional_check(loss, params, seed, eps=1e-5):
  """Relative error of jax.grad and jax.jvp against central differences along a random
  direction of the params."""
  leaves, treedef = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  direction = treedef.unflatten(
    [jax.random.normal(k, leaf.shape, leaf.dtype) for k, leaf in zip(keys, leaves, strict=True)]
  )
  shifted = lambda t: jax.tree.map(lambda p, d: p + t * d, params, direction)
  finite = (loss(shifted(eps)) - loss(shifted(-eps))) / (2 * eps)
  grad = jax.grad(loss)(params)
  reverse = sum(
    jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(grad), jax.tree.leaves(direction), strict=True)
  )
  forward = jax.jvp(loss, (params,), (direction,))[1]
  return float(abs(reverse - finite) / abs(finite)), float(abs(forward - finite) / abs(finite))


def test_gradients_through_sampling_match_finite_differences(float64):
  """Reverse and forward mode through sample_and_log_prob (LU solves, Newton inverses); the
  conditional flow's inverse is the same `stack_inverse` with modulations."""
  model, params = flow(F64)
  rng = jax.random.PRNGKey(7)

  def loss(params):
    x, log_p = model.apply({"params": params}, rng, 64, method="sample_and_log_prob")
    return jnp.mean(log_p + jnp.sin(x).sum(-1))

  errors = directional_check(jax.jit(loss), params, 8)
  print(f"gradients through sampling vs finite differences: max relative error {max(errors):.1e}")
  assert max(errors) < 1e-6


def test_layer_terms_add_up_to_the_jacobian_log_det(float64):
  """forward_and_layer_terms: each layer's kernel term is its slogdet, the last layer has no
  activation term, and all terms add up to log|det ∂z/∂x| of the full jacfwd Jacobian."""
  model = fr.FlowMLP(
    3, fr.SmoothLeakyReLU(0.2), param_dtype=jnp.float64, spline_bins=4, spline_bound=2.0
  )
  x = jax.random.normal(jax.random.PRNGKey(0), (5, 3), jnp.float64)
  params = perturbed_init(model, x, seed=1)
  apply = jitted(model, params)
  z, terms = apply(fr.FlowMLP.forward_and_layer_terms, x)
  assert len(terms) == 3 and all(isinstance(t, fr.LayerTerms) for t in terms)
  for index, term in enumerate(terms):
    kernel = params[f"layers_{index}"]["kernel"]
    np.testing.assert_allclose(term.kernel_log_abs_det, jnp.linalg.slogdet(kernel)[1], rtol=1e-13)
    assert term.preactivation.shape == x.shape and term.spline_log_det.shape == (5,)
  assert not jnp.any(terms[-1].activation_log_det) and not jnp.any(terms[0].modulation_log_det)
  jacobians = jax.vmap(jax.jacfwd(lambda v: apply("__call__", v[None])[0]))(x)
  total = sum(term.total() for term in terms)
  np.testing.assert_allclose(total, jnp.linalg.slogdet(jacobians)[1], rtol=1e-12)
  np.testing.assert_allclose(z, apply("__call__", x), rtol=1e-14)
