"""ConditionalFlowMLP: exact log p(x | c) against a brute-force Jacobian, inverse, sampling."""

import functools

import flax.linen as nn
from flax.training import train_state
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import flax_relgrad as fr
from conftest import jitted
from conftest import perturbed_init


def make_model(context_scale=True, conditioner=True, dtype=jnp.float32):
  mlp = nn.Sequential([nn.Dense(8, param_dtype=dtype), nn.tanh]) if conditioner else None
  return fr.ConditionalFlowMLP(3, mlp, fr.SmoothLeakyReLU(0.2), context_scale, param_dtype=dtype)


@pytest.mark.parametrize("context_scale", [True, False])
@pytest.mark.parametrize("conditioner", [True, False])
def test_log_prob_matches_jacfwd_brute_force(float64, context_scale, conditioner):
  model = make_model(context_scale, conditioner, jnp.float64)
  x = jax.random.normal(jax.random.PRNGKey(0), (7, 4))
  c = jax.random.normal(jax.random.PRNGKey(1), (7, 2))
  params = perturbed_init(model, x, c, seed=2)
  forward = lambda x, c: model.apply({"params": params}, x[None], c[None])[0]
  jacobians = jax.jit(jax.vmap(jax.jacfwd(forward)))(x, c)
  expected = fr.standard_normal_log_prob(jax.vmap(forward)(x, c)) + jnp.linalg.slogdet(jacobians)[1]
  log_prob = jitted(model, params)("log_prob", x, c)
  np.testing.assert_allclose(log_prob, expected, rtol=1e-10)


def test_context_changes_the_density_and_inverse_round_trips(float64):
  model = make_model(dtype=jnp.float64)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 4))  # any leading shape
  c = jax.random.normal(jax.random.PRNGKey(1), (2, 5, 2))
  params = perturbed_init(model, x, c, seed=2)
  z = model.apply({"params": params}, x, c)
  np.testing.assert_allclose(
    model.apply({"params": params}, z, c, method="inverse"), x, rtol=1e-9, atol=1e-10
  )
  other = model.apply({"params": params}, x, c[::-1], method="log_prob")
  assert not np.allclose(other, model.apply({"params": params}, x, c, method="log_prob"))


def test_sample_one_draw_per_context_row():
  model = make_model()
  c = jnp.linspace(-1, 1, 12).reshape(6, 2)
  params = perturbed_init(model, jnp.ones((6, 3)), c, seed=0, scale=0.1)
  samples = model.apply({"params": params}, jax.random.PRNGKey(2), c, method="sample")
  assert samples.shape == (6, 3) and bool(jnp.all(jnp.isfinite(samples)))
  z = model.apply({"params": params}, samples, c)
  np.testing.assert_allclose(z, jax.random.normal(jax.random.PRNGKey(2), (6, 3)), atol=1e-4)


def test_context_as_lists_and_contexts_of_another_width():
  """A context given as nested lists is the array it describes (for sampling too); without a
  conditioner, one of another width than at init is refused naming the head's width."""
  c = jnp.linspace(-1, 1, 12).reshape(6, 2)
  for model in (make_model(), fr.ConditionalFlowMLP(2)):
    params = perturbed_init(model, jnp.ones((6, 3)), c, seed=0, scale=0.1)
    apply = functools.partial(model.apply, {"params": params})
    x = jnp.ones((6, 3))
    np.testing.assert_array_equal(
      apply(x, c.tolist(), method="log_prob"), apply(x, c, method="log_prob")
    )
    key = jax.random.PRNGKey(3)
    np.testing.assert_array_equal(
      apply(key, c.tolist(), method="sample"), apply(key, c, method="sample")
    )
  model = fr.ConditionalFlowMLP(2)
  params = perturbed_init(model, x, c, seed=0)
  with pytest.raises(ValueError, match="modulation head takes 2 features per row, but the context"):
    model.apply({"params": params}, x, jnp.ones((6, 3)), method="log_prob")


def test_learns_a_context_dependent_density():
  """x | c ~ N(2c, (1 + c²)·I): the conditional flow beats the best context-free Gaussian."""
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  c = jax.random.uniform(keys[0], (4000, 1), minval=-1.5, maxval=1.5)
  x = 2.0 * c + jnp.sqrt(1.0 + c**2) * jax.random.normal(keys[1], (4000, 2))
  model = make_model()
  params = model.init(keys[2], x[:2], c[:2])["params"]
  state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=optax.adam(1e-2))
  grad_fn = fr.value_and_relative_grad(model, fr.nll)

  @jax.jit
  def step(state, x, c):
    _, grads = grad_fn(state.params, x, c)
    return state.apply_gradients(grads=grads)

  for index in range(600):
    rows = slice((index % 39) * 100, (index % 39 + 1) * 100)
    state = step(state, x[rows], c[rows])
  log_prob = float(
    model.apply({"params": state.params}, x[3900:], c[3900:], method="log_prob").mean()
  )
  marginal = x[:3900]
  best_gaussian = float(
    jnp.mean(
      jax.scipy.stats.multivariate_normal.logpdf(x[3900:], marginal.mean(0), jnp.cov(marginal.T))
    )
  )
  truth = float(
    jnp.mean(
      jax.scipy.stats.norm.logpdf(x[3900:], 2 * c[3900:], jnp.sqrt(1 + c[3900:] ** 2)).sum(-1)
    )
  )
  print(
    f"held-out log p: conditional flow {log_prob:.3f}, best Gaussian {best_gaussian:.3f}, truth {truth:.3f}"
  )
  assert log_prob > best_gaussian + 0.5 and log_prob > truth - 0.1
