"""SmoothLeakyReLU against brute force: values, log-derivative, inverse."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flax_relgrad as fr

ALPHAS = [0.01, 0.3, 1.0]


@pytest.mark.parametrize("alpha", ALPHAS)
def test_log_derivative_matches_autodiff(float64, alpha):
  activation = fr.SmoothLeakyReLU(alpha)
  t = jnp.linspace(-40.0, 40.0, 801)
  derivative = jax.vmap(jax.grad(activation))(t)
  np.testing.assert_allclose(activation.log_derivative(t), jnp.log(derivative), rtol=0, atol=1e-13)


@pytest.mark.parametrize("alpha", ALPHAS)
def test_log_derivative_is_finite_and_exact_at_extremes(alpha):
  activation = fr.SmoothLeakyReLU(alpha)
  t = jnp.array([-1e4, -1e3, 1e3, 1e4], jnp.float32)
  values = activation.log_derivative(t)
  assert jnp.all(jnp.isfinite(values))
  np.testing.assert_allclose(values, [np.log(alpha)] * 2 + [0.0] * 2, atol=1e-6)


@pytest.mark.parametrize("alpha", ALPHAS)
def test_inverse_round_trip_float32_whole_line(alpha):
  activation = fr.SmoothLeakyReLU(alpha)
  t = jnp.concatenate(
    [-jnp.logspace(-6, 4, 400), jnp.linspace(-30, 30, 601), jnp.logspace(-6, 4, 400)]
  ).astype(jnp.float32)
  recovered = jax.jit(activation.inverse)(activation(t))
  assert recovered.dtype == jnp.float32
  # σ⁻¹ is 1/α-Lipschitz, so rounding σ(t) to float32 can move the answer by |σ(t)|·eps/α.
  eps = np.finfo(np.float32).eps
  bound = 4 * eps * (jnp.abs(t) + jnp.abs(activation(t)) / alpha) + 1e-30
  assert jnp.all(jnp.abs(recovered - t) <= bound), float(jnp.max(jnp.abs(recovered - t) / bound))


def test_inverse_vmaps_and_solves_exactly(float64):
  activation = fr.SmoothLeakyReLU(0.01)
  y = jax.random.normal(jax.random.PRNGKey(0), (4, 7)) * 5
  t = jax.vmap(activation.inverse)(y)
  np.testing.assert_allclose(activation(t), y, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("alpha", [0.0, -0.1, 1.5])
def test_bad_alpha_is_rejected(alpha):
  with pytest.raises(ValueError, match="0 < alpha <= 1"):
    fr.SmoothLeakyReLU(alpha)


@dataclasses.dataclass(frozen=True)
class Arcsinh:
  """Another strictly increasing activation: σ(t) = asinh(t), to check the protocol."""

  def __call__(self, t):
    return jnp.arcsinh(t)

  def log_derivative(self, t):
    return -0.5 * jnp.log1p(jnp.square(t))

  def inverse(self, y):
    return jnp.sinh(y)


def test_custom_activation_plugs_into_flow(float64):
  assert isinstance(Arcsinh(), fr.Activation)
  model = fr.FlowMLP(num_layers=3, activation=Arcsinh(), param_dtype=jnp.float64)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4)))["params"]
  x = jax.random.normal(jax.random.PRNGKey(1), (6, 4))
  z = model.apply({"params": params}, x)
  np.testing.assert_allclose(
    model.apply({"params": params}, z, method=fr.FlowMLP.inverse), x, atol=1e-12
  )
  jacobians = jax.vmap(jax.jacfwd(lambda v: model.apply({"params": params}, v)))(x)
  expected = fr.standard_normal_log_prob(z) + jnp.linalg.slogdet(jacobians)[1]
  np.testing.assert_allclose(
    model.apply({"params": params}, x, method=fr.FlowMLP.log_prob), expected, rtol=1e-12
  )


@pytest.mark.parametrize("alpha", [0.01, 0.3])
def test_inverse_derivatives_match_finite_differences(float64, alpha):
  """Implicit differentiation (no differentiation through the Newton loop): reverse and
  forward mode, first and second order, against central differences."""
  activation = fr.SmoothLeakyReLU(alpha)
  y = jnp.array([-30.0, -1.0, -1e-3, 0.0, 0.7, 25.0])
  eps = 1e-6
  finite = (activation.inverse(y + eps) - activation.inverse(y - eps)) / (2 * eps)
  np.testing.assert_allclose(jax.vmap(jax.grad(activation.inverse))(y), finite, rtol=1e-6)
  np.testing.assert_allclose(
    jax.jvp(activation.inverse, (y,), (jnp.ones_like(y),))[1], finite, rtol=1e-6
  )
  first = jax.vmap(jax.grad(activation.inverse))
  second_finite = (first(y + eps) - first(y - eps)) / (2 * eps)
  second = jax.vmap(jax.grad(jax.grad(activation.inverse)))(y)
  np.testing.assert_allclose(second, second_finite, rtol=1e-5, atol=1e-6)
