"""Native NNX flows (`flax_relgrad.nnx`) against brute force and against the Linen modules.

In float64: the gradient `frn.value_and_relative_grad` gives every flow layer must equal
Ŵ Ŵᵀ Ĝ (Ĝ the autodiff gradient of the exact loss, slogdet included), every other
parameter its autodiff gradient, and 100 Adam steps must land on the Linen flow's parameters.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import flax_relgrad as fr
from conftest import HAS_NNX
from conftest import brute_force_relative_gradient
from conftest import perturb_params
from conftest import perturbed_init

if not HAS_NNX:
  pytest.skip("flax_relgrad.nnx needs flax >= 0.12", allow_module_level=True)

from flax import nnx  # noqa: E402

import flax_relgrad.nnx as frn  # noqa: E402

F64 = jnp.float64


def flat(tree):
  """{'a/0/kernel': leaf} of an nnx.State or a dict (Variable wrappers skipped)."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  keys = lambda path: "/".join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))
  return {keys(path): leaf for path, leaf in leaves}


def perturb(model, seed=1):
  """Moves every parameter by 0.3·N(0, 1), so that no term of a gradient vanishes."""
  nnx.update(model, perturb_params(nnx.as_pure(nnx.state(model, nnx.Param)), seed))


class Composite(nnx.Module):
  """Two flows with an ordinary elementwise affine map between them, a learned base, and an
  ordinary linear head in an extra loss term."""

  def __init__(self, rngs):
    self.first = frn.FlowMLP(3, 2, activation=fr.SmoothLeakyReLU(0.3), param_dtype=F64, rngs=rngs)
    self.log_scale = nnx.Param(jnp.zeros(3, F64))
    self.shift = nnx.Param(jnp.zeros(3, F64))
    self.second = frn.FlowMLP(
      3, 1, use_bias=False, base="diagonal_gaussian", param_dtype=F64, rngs=rngs
    )
    self.head = nnx.Linear(3, 1, param_dtype=F64, rngs=rngs)

  def log_prob(self, x):
    z, first = self.first.forward_and_log_det(x)
    z = z * jnp.exp(self.log_scale[...]) + self.shift[...]
    return self.second.log_prob(z) + first + self.log_scale[...].sum()


def composite_loss(model, x, other):
  """The first flow is applied to two batches of different sizes (two calls per layer)."""
  nll = -model.log_prob(x).mean() - 0.5 * model.log_prob(other).mean()
  return nll + 0.1 * jnp.mean(model.head(x) ** 2)


def nll(model, x):
  return -model.log_prob(x).mean()


def normal(seed, shape):
  return jax.random.normal(jax.random.PRNGKey(seed), shape, F64)


def check_against_brute_force(model, loss_fn, *args):
  """Max relative error of the flow layers' updates; the other leaves must be exact."""
  loss, grads = nnx.jit(frn.value_and_relative_grad(loss_fn))(model, *args)
  updates = flat(nnx.as_pure(grads))
  exact = flat(nnx.jit(nnx.grad(loss_fn))(model, *args))
  params = flat(nnx.as_pure(nnx.state(model, nnx.Param)))
  layers = sorted(
    {
      module_path
      for module_path, module in (("/".join(map(str, p)), m) for p, m in nnx.iter_modules(model))
      if isinstance(module, frn.FlowDense)
    }
  )
  errors = []
  for layer in layers:
    bias = params.get(f"{layer}/bias")
    expected = brute_force_relative_gradient(
      params[f"{layer}/kernel"],
      bias,
      exact[f"{layer}/kernel"],
      None if bias is None else exact[f"{layer}/bias"],
    )
    for name, value in zip(("kernel", "bias"), expected, strict=True):
      if f"{layer}/{name}" in params:
        error = jnp.max(jnp.abs(updates[f"{layer}/{name}"] - value)) / jnp.max(jnp.abs(value))
        errors.append(float(error))
  others = sorted(path for path in params if path.rsplit("/", 1)[0] not in layers)
  for path in others:
    np.testing.assert_allclose(updates[path], exact[path], rtol=1e-12, atol=1e-15)
  return layers, others, max(errors)


def test_update_equals_brute_force(float64):
  """Two flows (one with a learned base), an ordinary affine map between them, an ordinary
  linear head, the first flow called on two batches of different sizes."""
  model = Composite(nnx.Rngs(2))
  perturb(model, 3)
  batches = normal(4, (9, 3)), normal(5, (4, 3))
  layers, others, error = check_against_brute_force(model, composite_loss, *batches)
  assert layers == ["first/layers/0", "first/layers/1", "second/layers/0"]
  assert others == [
    "head/bias",
    "head/kernel",
    "log_scale",
    "second/base_distribution/loc",
    "second/base_distribution/log_scale",
    "shift",
  ]
  print(f"NNX update vs brute force: max relative error {error:.1e}")
  assert error < 1e-10


def penalised_composite_loss(model, x, other):
  """The composite loss plus what a user may write about the flow params directly: an L2
  penalty on every flow kernel and bias, and the first kernel tied into a reconstruction."""
  flows = nnx.state(model.first, nnx.Param), nnx.state(model.second, nnx.Param)
  penalty = sum(jnp.sum(leaf**2) for state in flows for leaf in jax.tree_util.tree_leaves(state))
  kernel = model.first.layers[0].kernel[...]
  reconstruction = jnp.mean((x @ kernel @ kernel.T - x) ** 2)
  return composite_loss(model, x, other) + 0.3 * penalty + reconstruction


def test_loss_that_reads_flow_params_directly_gets_their_exact_relative_gradient(float64):
  model = Composite(nnx.Rngs(2))
  perturb(model, 3)
  batches = normal(4, (9, 3)), normal(5, (4, 3))
  _, _, error = check_against_brute_force(model, penalised_composite_loss, *batches)
  print(f"NNX update with direct reads vs brute force: max relative error {error:.1e}")
  assert error < 1e-10


def test_a_flow_param_shared_with_another_module_names_the_fix():
  """nnx.state lists a shared Param under one path only, here the other module's."""

  class Tied(nnx.Module):
    def __init__(self, rngs):
      self.flow = frn.FlowMLP(3, 2, rngs=rngs)
      self.decoder = nnx.Linear(3, 3, rngs=rngs)
      self.decoder.kernel = self.flow.layers[0].kernel

  loss_fn = lambda m, x: -m.flow.log_prob(x).mean() + jnp.mean(m.decoder(x) ** 2)
  with pytest.raises(ValueError, match=r"shared with another module.*kernel\[\.\.\.\]"):
    frn.value_and_relative_grad(loss_fn)(Tied(nnx.Rngs(0)), jnp.ones((4, 3)))


def test_exact_loss_and_has_aux(float64):
  model = frn.FlowMLP(3, 2, param_dtype=F64, rngs=nnx.Rngs(0))
  perturb(model)
  x = normal(1, (6, 3))
  (loss, aux), _ = frn.value_and_relative_grad(
    lambda m, x: (nll(m, x), x.shape[0]), has_aux=True, exact_loss=True
  )(model, x)
  np.testing.assert_allclose(loss, nll(model, x), rtol=1e-13)
  assert aux == 6
  loss_without, _ = frn.value_and_relative_grad(nll)(model, x)
  np.testing.assert_allclose(loss_without, nll(model, x) + model.kernel_log_abs_det(), rtol=1e-13)


@pytest.mark.parametrize("placement, num_splines", [("every_layer", 2), ("input", 1)])
def test_splines_brute_force_inverse_and_linen_parity(float64, placement, num_splines):
  """The Linen FlowMLP with splines is checked against jacfwd in test_splines.py; equal
  log_prob on the same params carries that check over."""
  settings = {"spline_bins": 4, "spline_bound": 1.5, "spline_placement": placement}
  model = frn.FlowMLP(3, 2, param_dtype=F64, **settings, rngs=nnx.Rngs(0))
  perturb(model, 1)
  x = normal(2, (7, 3))
  layers, others, error = check_against_brute_force(model, nll, x)
  assert layers == ["layers/0", "layers/1"] and error < 1e-10
  assert others == [
    f"splines/{k}/{name}"
    for k in range(num_splines)
    for name in ("derivatives", "heights", "widths")
  ]
  np.testing.assert_allclose(model.inverse(model(x)), x, atol=1e-10)
  pure = nnx.as_pure(nnx.state(model, nnx.Param))
  linen_params = {f"layers_{k}": dict(pure["layers"][k]) for k in (0, 1)}
  linen_params |= {f"splines_{k}": dict(pure["splines"][k]) for k in range(num_splines)}
  linen = fr.FlowMLP(2, param_dtype=F64, **settings)
  np.testing.assert_allclose(
    linen.apply({"params": linen_params}, x, method="log_prob"), model.log_prob(x), rtol=1e-13
  )


def linen_params_to_nnx(model, params):
  """Loads a Linen FlowMLP's params into the NNX FlowMLP `model`."""
  pure = {"layers": {k: params[f"layers_{k}"] for k in range(len(model.layers))}}
  if "base_distribution" in params:
    pure["base_distribution"] = params["base_distribution"]
  state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(state, pure)
  nnx.update(model, state)


def test_parity_with_linen_after_100_adam_steps(float64):
  """Same initial params, same batches: the same params after 100 steps."""
  activation = fr.SmoothLeakyReLU(0.1)
  linen = fr.FlowMLP(2, activation, param_dtype=F64, base="diagonal_gaussian")
  data = normal(0, (400, 4)) @ jnp.array(
    [[1.0, 0.5, 0, 0], [0, 0.3, 0.2, 0], [0.4, 0, 2.0, 0], [0, 0, 0.5, 0.7]]
  )
  params = perturbed_init(linen, data[:2], seed=1, scale=0.1)
  model = frn.FlowMLP(
    4, 2, activation=activation, param_dtype=F64, base="diagonal_gaussian", rngs=nnx.Rngs(0)
  )
  linen_params_to_nnx(model, params)
  for method in ("log_prob", "forward_and_log_det", "inverse_and_log_det"):
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12),
      getattr(model, method)(data[:5]),
      linen.apply({"params": params}, data[:5], method=method),
    )
  tx = lambda: optax.adam(1e-2)
  opt_state = tx().init(params)
  optimizer = nnx.Optimizer(model, tx(), wrt=nnx.Param)

  @jax.jit
  def linen_step(params, opt_state, x):
    _, grads = fr.value_and_relative_grad(linen, fr.nll)(params, x)
    updates, opt_state = tx().update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  @nnx.jit
  def nnx_step(model, optimizer, x):
    loss, grads = frn.value_and_relative_grad(nll)(model, x)
    optimizer.update(model, grads)
    return loss

  for step in range(100):
    x = data[(step % 8) * 50 : (step % 8 + 1) * 50]
    params, opt_state = linen_step(params, opt_state, x)
    nnx_step(model, optimizer, x)
  expected = flat(params)
  got = flat(nnx.as_pure(nnx.state(model, nnx.Param)))
  error = max(
    float(jnp.max(jnp.abs(got[path.replace("layers_", "layers/")] - value)))
    for path, value in expected.items()
  )
  print(f"NNX vs Linen after 100 Adam steps: max abs parameter difference {error:.1e}")
  assert error < 1e-9
  initial = linen.init(jax.random.PRNGKey(1), data[:2])["params"]["layers_0"]["kernel"]
  assert float(jnp.max(jnp.abs(params["layers_0"]["kernel"] - initial))) > 0.1  # it did train
  rng = jax.random.PRNGKey(3)
  x, log_p = model.sample_and_log_prob(rng, (2, 5))
  linen_x, linen_log_p = linen.apply({"params": params}, rng, (2, 5), method="sample_and_log_prob")
  np.testing.assert_allclose(x, linen_x, rtol=1e-9)
  np.testing.assert_allclose(log_p, linen_log_p, rtol=1e-9)


class WithState(nnx.Module):
  """A flow next to a layer, and a non-Param variable the loss updates on every call."""

  def __init__(self, rngs):
    self.flow = frn.FlowMLP(3, 2, rngs=rngs)
    self.scale = nnx.Linear(3, 3, rngs=rngs)
    self.calls = nnx.BatchStat(jnp.zeros((), jnp.int32))

  def __call__(self, x):
    self.calls[...] += 1
    return self.flow.log_prob(x + 0.0 * self.scale(x))


def test_any_batch_size_no_state_left_in_the_model():
  """Under nnx.jit, batches of several sizes: no error, the model holds nothing but its own
  variables after each step, and the loss's state update is applied once per step (the
  shape-only discovery pass leaves no trace)."""
  model = WithState(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
  before = nnx.state(model, nnx.Param)

  @nnx.jit
  def step(model, optimizer, x):
    loss, grads = frn.value_and_relative_grad(lambda m, x: -m(x).mean())(model, x)
    optimizer.update(model, grads)
    return loss

  for index, batch in enumerate((16, 32, 1, 16)):
    loss = step(model, optimizer, jax.random.normal(jax.random.PRNGKey(batch), (batch, 3)))
    assert jnp.isfinite(loss)
    assert set(flat(nnx.state(model, nnx.Not(nnx.Param)))) == {"calls"}
    assert int(model.calls[...]) == index + 1
  assert jax.tree.structure(nnx.state(model, nnx.Param)) == jax.tree.structure(before)


def test_misuse_fails_loudly():
  model = frn.FlowMLP(3, 2, rngs=nnx.Rngs(0))
  x = jnp.ones((4, 3))
  outside = frn.FlowDense(3, rngs=nnx.Rngs(1))
  with pytest.raises(ValueError, match="not an attribute of the model"):
    frn.value_and_relative_grad(lambda m, x: nll(m, outside(x)))(model, x)
  with pytest.raises(ValueError, match="runs a flow layer backwards"):
    frn.value_and_relative_grad(
      lambda m, x: -m.sample_and_log_prob(jax.random.PRNGKey(0), 4)[1].mean()
    )(model, x)
  with pytest.raises(ValueError, match="never uses its log"):
    frn.value_and_relative_grad(lambda m, x: jnp.sum(m(x) ** 2))(model, x)
  with pytest.raises(ValueError, match=r"D = 3 \(3×3 kernels\) but got inputs of shape \(4, 5\)"):
    model.log_prob(jnp.ones((4, 5)))
  with pytest.raises(ValueError, match=r"empty inputs of shape \(0, 3\)"):
    frn.value_and_relative_grad(nll)(model, jnp.ones((0, 3)))


class Ensemble(nnx.Module):
  """A mixture of 3 flows stacked by nnx.vmap (kernels (3, 3, 3)) with learned mixture
  weights: log p(x) = logsumexp_e(log π_e + log p_e(x)), not affine in the flows'
  log-likelihoods, so λ_e depends on the log-det values (exact_loss=True)."""

  def __init__(self, rngs):
    @nnx.split_rngs(splits=3)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
      return frn.FlowMLP(3, 2, activation=fr.SmoothLeakyReLU(0.3), param_dtype=F64, rngs=rngs)

    self.flows = make(rngs)
    self.logits = nnx.Param(jnp.zeros(3, F64))

  def log_prob(self, x):
    per_flow = nnx.vmap(lambda flow, x: flow.log_prob(x), in_axes=(0, None), out_axes=0)
    log_weights = jax.nn.log_softmax(self.logits[...])
    return jax.nn.logsumexp(per_flow(self.flows, x) + log_weights[:, None], axis=0)


def ensemble_loss(model, x, other):
  """The stacked layers are applied to two batches of different sizes (two calls each)."""
  return -model.log_prob(x).mean() - 0.5 * model.log_prob(other).mean()


def test_stacked_flows_under_nnx_vmap_equal_brute_force(float64):
  """Each of the 3 stacked kernels gets its own exact update (Ŵ_e Ŵ_eᵀ Ĝ_e, float64), the
  mixture logits their ordinary gradient, and the model holds nothing else afterwards."""
  model = Ensemble(nnx.Rngs(0))
  perturb(model, 2)
  x, other = normal(3, (7, 3)), normal(4, (2, 3))
  loss, grads = nnx.jit(frn.value_and_relative_grad(ensemble_loss, exact_loss=True))(
    model, x, other
  )
  assert set(flat(nnx.state(model, nnx.Not(nnx.Param)))) == set()
  np.testing.assert_allclose(loss, nnx.jit(ensemble_loss)(model, x, other), rtol=1e-13)
  updates = flat(nnx.as_pure(grads))
  exact = flat(nnx.grad(ensemble_loss)(model, x, other))
  params = flat(nnx.as_pure(nnx.state(model, nnx.Param)))
  np.testing.assert_allclose(updates["logits"], exact["logits"], rtol=1e-12)
  errors = []
  for layer in ("flows/layers/0", "flows/layers/1"):
    assert params[f"{layer}/kernel"].shape == (3, 3, 3)
    for e in range(3):
      expected = brute_force_relative_gradient(
        *(params[f"{layer}/{name}"][e] for name in ("kernel", "bias")),
        *(exact[f"{layer}/{name}"][e] for name in ("kernel", "bias")),
      )
      for name, value in zip(("kernel", "bias"), expected, strict=True):
        error = jnp.max(jnp.abs(updates[f"{layer}/{name}"][e] - value)) / jnp.max(jnp.abs(value))
        errors.append(float(error))
  print(f"nnx.vmap-stacked flows vs brute force: max relative error {max(errors):.1e}")
  assert max(errors) < 1e-10


def test_stacked_flows_on_another_axis_or_broadcast_are_refused():
  """nnx.vmap with the flow's state on axis 1, or broadcast over a batch axis, would need
  per-index pre-activations the model cannot hold: clear errors, not wrong updates."""
  x = jnp.ones((4, 3))

  @nnx.split_rngs(splits=2)
  @nnx.vmap(in_axes=(0,), out_axes=1)
  def make(rngs):
    return frn.FlowMLP(3, 1, rngs=rngs)

  on_axis_one = nnx.vmap(lambda flow, x: flow.log_prob(x), in_axes=(1, None), out_axes=0)
  with pytest.raises(ValueError, match="stacked by nnx.vmap on another axis than 0"):
    frn.value_and_relative_grad(lambda m, x: -on_axis_one(m, x).mean())(make(nnx.Rngs(0)), x)
  broadcast = nnx.vmap(lambda flow, x: flow.log_prob(x), in_axes=(None, 0), out_axes=0)
  with pytest.raises(ValueError, match="inside nnx.vmap with its state broadcast"):
    frn.value_and_relative_grad(lambda m, x: -broadcast(m, x).mean())(
      frn.FlowMLP(3, 1, rngs=nnx.Rngs(0)), x[None]
    )


class Conditioner(nnx.Module):
  """A small MLP c (..., 2) → h (..., 5)."""

  def __init__(self, rngs):
    self.linear = nnx.Linear(2, 5, param_dtype=F64, rngs=rngs)

  def __call__(self, c):
    return jnp.tanh(self.linear(c))


def test_conditional_brute_force_and_linen_parity(float64):
  """NNX ConditionalFlowMLP (a conditioner, context scales, a learned base): relative update
  vs brute force; log_prob, the inverse and sample_and_log_prob equal to the Linen module's
  on the same params (the Linen module is checked against jacfwd in test_conditional.py)."""
  model = frn.ConditionalFlowMLP(
    3,
    5,
    2,
    conditioner=Conditioner(nnx.Rngs(1)),
    activation=fr.SmoothLeakyReLU(0.2),
    param_dtype=F64,
    base="diagonal_gaussian",
    rngs=nnx.Rngs(0),
  )
  perturb(model, 4)
  x, c = normal(5, (7, 3)), normal(6, (7, 2))
  layers, others, error = check_against_brute_force(
    model, lambda m, x, c: -m.log_prob(x, c).mean(), x, c
  )
  assert (
    layers == ["layers/0", "layers/1"] and len(others) == 6
  )  # base (2), conditioner (2), head (2)
  assert error < 1e-10

  class LinenConditioner(nn.Module):
    @nn.compact
    def __call__(self, c):
      return jnp.tanh(nn.Dense(5, param_dtype=F64, name="linear")(c))

  linen = fr.ConditionalFlowMLP(
    2, LinenConditioner(), fr.SmoothLeakyReLU(0.2), param_dtype=F64, base="diagonal_gaussian"
  )
  state = flat(nnx.as_pure(nnx.state(model, nnx.Param)))
  params = {
    "layers_0": {"kernel": state["layers/0/kernel"], "bias": state["layers/0/bias"]},
    "layers_1": {"kernel": state["layers/1/kernel"], "bias": state["layers/1/bias"]},
    "conditioner": {
      "linear": {
        "kernel": state["conditioner/linear/kernel"],
        "bias": state["conditioner/linear/bias"],
      }
    },
    "head": {"Dense_0": {"kernel": state["head/linear/kernel"], "bias": state["head/linear/bias"]}},
    "base_distribution": {
      "loc": state["base_distribution/loc"],
      "log_scale": state["base_distribution/log_scale"],
    },
  }
  assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(
    linen.init(jax.random.PRNGKey(0), x, c, method="log_prob")["params"]
  )
  apply = lambda method, *args: linen.apply({"params": params}, *args, method=method)
  np.testing.assert_allclose(model.log_prob(x, c), apply("log_prob", x, c), rtol=1e-13)
  z = model(x, c)
  np.testing.assert_allclose(model.inverse(z, c), x, atol=1e-12)
  draws, log_p = model.sample_and_log_prob(jax.random.PRNGKey(3), c, 4)
  linen_draws, linen_log_p = apply("sample_and_log_prob", jax.random.PRNGKey(3), c, 4)
  assert draws.shape == (4, 7, 3)
  np.testing.assert_allclose(draws, linen_draws, atol=1e-12)
  np.testing.assert_allclose(log_p, linen_log_p, rtol=1e-12)
  np.testing.assert_allclose(
    log_p, model.log_prob(draws, jnp.broadcast_to(c, (4, 7, 2))), rtol=1e-10
  )
  with pytest.raises(TypeError, match="takes one context array"):
    model.log_prob(x)


def test_contexts_of_another_width_than_context_features_are_refused():
  model = frn.ConditionalFlowMLP(2, 3, 2, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="modulation head takes 3 features per row, but the context"):
    model.log_prob(jnp.ones((4, 2)), jnp.ones((4, 1)))
  assert model.log_prob(jnp.ones((4, 2)), jnp.ones((4, 3)).tolist()).shape == (4,)


def test_inputs_of_another_width_are_refused():
  """A standalone spline or dense layer refuses inputs whose D is not its own instead of
  broadcasting them against its (D,) parameters."""
  spline = frn.RationalQuadraticSpline(3, 4)
  for method in (spline.forward_and_log_det, spline.inverse):
    with pytest.raises(ValueError, match="D = 3 coordinates but got inputs of width 1"):
      method(jnp.ones((2, 1)))
  layer = frn.FlowDense(3, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"outputs y of shape \(2, 1\)"):
    layer.inverse(jnp.ones((2, 1)))


def test_raw_jax_transforms_in_the_loss_name_the_fix():
  """A raw jax.vmap or jax.checkpoint around the flow in the loss raises the library's advice
  instead of Flax's TraceContextError about a private class."""
  model = frn.FlowMLP(4, num_layers=2, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.PRNGKey(0), (8, 4))
  for loss in (
    lambda m, x: -jax.vmap(m.log_prob)(x).mean(),
    lambda m, x: -jax.checkpoint(m.log_prob)(x).mean(),
  ):
    with pytest.raises(ValueError, match="applies a flow layer inside a raw JAX transform"):
      frn.value_and_relative_grad(loss)(model, x)


def test_widths_below_one_and_non_activations_are_refused():
  for make, message in (
    (lambda: frn.FlowMLP(0, 2, rngs=nnx.Rngs(0)), "width D >= 1, got 0"),
    (lambda: frn.FlowDense(0, rngs=nnx.Rngs(0)), "width D >= 1, got 0"),
    (lambda: frn.RationalQuadraticSpline(-1, 4), "width D >= 1, got -1"),
    (lambda: frn.FlowMLP(3, 2, activation=jnp.tanh, rngs=nnx.Rngs(0)), "must be an Activation"),
  ):
    with pytest.raises(ValueError, match=message):
      make()


class ScannedStack(nnx.Module):
  """Three dense layers stacked by nnx.vmap (kernels (3, 3, 3)) and applied in turn by
  nnx.scan over the stack: each step applies its own layer."""

  def __init__(self, rngs):
    @nnx.split_rngs(splits=3)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
      return frn.FlowDense(3, param_dtype=F64, rngs=rngs)

    self.layers = make(rngs)

  def log_prob(self, x):
    activation = fr.SmoothLeakyReLU(0.3)

    @nnx.scan(in_axes=(0, nnx.Carry), out_axes=(nnx.Carry, 0))
    def step(layer, z):
      y = layer(z)
      return activation(y), activation.log_derivative(y).sum(-1) + layer.log_abs_det()

    z, terms = step(self.layers, x)
    return terms.sum(0) - 0.5 * (z**2).sum(-1) - 1.5 * jnp.log(2 * jnp.pi)


def test_nnx_transforms_that_apply_each_layer_once_are_exact(float64):
  """nnx.scan over stacked layers, nnx.cond with the flow in one branch, nnx.remat and nnx.jit
  in the loss, and the whole pass inside an outer jax.lax.scan of training steps: each flow
  layer's update equals Ŵ Ŵᵀ Ĝ (float64)."""
  stack = ScannedStack(nnx.Rngs(0))
  perturb(stack, 3)
  x = normal(5, (6, 3))
  _, grads = frn.value_and_relative_grad(nll)(stack, x)
  updates, exact = flat(nnx.as_pure(grads)), flat(nnx.grad(nll)(stack, x))
  params = flat(nnx.as_pure(nnx.state(stack, nnx.Param)))
  for e in range(3):
    expected = brute_force_relative_gradient(
      *(params[f"layers/{name}"][e] for name in ("kernel", "bias")),
      *(exact[f"layers/{name}"][e] for name in ("kernel", "bias")),
    )
    for name, value in zip(("kernel", "bias"), expected, strict=True):
      np.testing.assert_allclose(updates[f"layers/{name}"][e], value, rtol=1e-10, atol=1e-13)

  model = frn.FlowMLP(3, 2, activation=fr.SmoothLeakyReLU(0.3), param_dtype=F64, rngs=nnx.Rngs(1))
  perturb(model, 4)
  one_branch = lambda m, x: nnx.cond(True, lambda m, x: nll(m, x), lambda m, x: jnp.sum(x), m, x)
  for loss in (
    one_branch,
    lambda m, x: nnx.remat(nll)(m, x),
    lambda m, x: nnx.jit(nll)(m, x),
  ):
    assert check_against_brute_force(model, loss, x)[2] < 1e-10

  def training_steps(params, batches):
    def step(params, batch):
      loss, grads = frn.value_and_relative_grad(nll)(nnx.merge(graphdef, params), batch)
      return jax.tree_util.tree_map(lambda p, g: p - 1e-3 * g, params, grads), loss

    return jax.lax.scan(step, params, batches)

  graphdef, params = nnx.split(model, nnx.Param)
  batches = jnp.stack([x, 2.0 * x])
  first_step = jax.tree_util.tree_map(lambda p: p[...], training_steps(params, batches[:1])[0])
  _, grads = frn.value_and_relative_grad(nll)(model, x)
  expected = jax.tree_util.tree_map(lambda p, g: p[...] - 1e-3 * g[...], params, grads)
  for got, want in zip(jax.tree.leaves(first_step), jax.tree.leaves(expected), strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_transforms_that_share_copy_or_differentiate_a_layer_are_refused():
  """A layer shared across the steps of a loop, applied to a copy of the model whose state does
  not come back, or differentiated through inside the loss gave a wrong update without an
  error (relative errors 0.3 to 4 against brute force); now each names the fix."""
  model = frn.FlowMLP(3, 2, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 5, 3))

  def carried(m, x):
    _, log_p = nnx.scan(
      lambda f, xt: (f, f.log_prob(xt)), in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0)
    )(m, x)
    return -log_p.mean()

  def fori(m, x):
    body = lambda t, carry: (carry[0], carry[1] + carry[0].log_prob(x[t]).mean())
    return -nnx.fori_loop(0, x.shape[0], body, (m, jnp.zeros(())))[1]

  def split_vmap(m, x):
    graphdef, state = nnx.split(m)
    per_step = jax.vmap(lambda s, xt: nnx.merge(graphdef, s).log_prob(xt), in_axes=(None, 0))
    return -per_step(state, x).mean()

  def score_penalty(m, x):
    score = nnx.grad(lambda f, x: f.log_prob(x).sum(), argnums=1)(m, x)
    return nll(m, x) + 0.1 * (score**2).sum(-1).mean()

  broadcast = nnx.scan(lambda f, xt: f.log_prob(xt), in_axes=(None, 0), out_axes=0)
  for loss, message in (
    (lambda m, x: -broadcast(m, x).mean(), "inside a loop"),
    (carried, "inside a loop"),
    (fori, "inside a loop"),
    (lambda m, x: nll(nnx.clone(m), x), "applied to a copy of the model"),
    (split_vmap, "applied to a copy of the model"),
    (score_penalty, "differentiates through FlowDense 'layers/0'"),
  ):
    for transform in (frn.value_and_relative_grad, frn.value_grad_and_relative_args):
      with pytest.raises(ValueError, match=message):
        transform(loss)(model, x)


def test_differentiating_through_the_relative_gradient_is_refused():
  """nnx.grad through a step that uses the relative gradient (meta-learning), or of the raw
  outputs of value_grad_and_relative_args, got wrong derivatives (the pass reads W and b
  through stop_gradient); now it raises."""
  model = frn.FlowMLP(3, 2, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.PRNGKey(0), (8, 3))

  def validation_after_step(m, x):
    grads = frn.value_and_relative_grad(nll)(m, x)[1]
    params = nnx.state(m, nnx.Param)
    stepped = jax.tree_util.tree_map(lambda p, g: p - 0.1 * g, params, grads)
    copy = nnx.clone(m)
    nnx.update(copy, stepped)
    return nll(copy, x)

  def raw_grads_sum(m, x):
    grads = frn.value_grad_and_relative_args(nll)(m, x)[1]
    return sum(g.sum() for g in jax.tree_util.tree_leaves(grads))

  assert np.isfinite(validation_after_step(model, x))
  kernel = model.layers[0].kernel[...]
  for differentiated in (validation_after_step, raw_grads_sum):
    with pytest.raises(ValueError, match="its result is being differentiated"):
      nnx.grad(differentiated)(model, x)
  assert model.layers[0].kernel[...] is kernel  # the pass gave the model its params back


def test_keyword_arguments_and_aux_without_has_aux():
  """Keyword arguments reach the loss (keyword-only ones too); (loss, aux) without has_aux
  names the flag instead of a JAX tracer error."""
  model = frn.FlowMLP(3, 2, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.PRNGKey(0), (8, 3))
  weighted = lambda m, x, *, weight: weight * nll(m, x)
  for transform in (frn.value_and_relative_grad, frn.value_grad_and_relative_args):
    np.testing.assert_allclose(
      transform(weighted)(model, x, weight=2.0)[0], 2.0 * transform(nll)(model, x)[0], rtol=1e-6
    )
  with pytest.raises(ValueError, match="pass has_aux=True"):
    frn.value_and_relative_grad(lambda m, x: (nll(m, x), {"mean": x.mean()}))(model, x)


def test_a_tuple_of_modules_gets_the_same_updates_as_a_dict_of_them():
  """`nnx.value_and_grad` takes a tuple of modules; its flow layers' paths hold sequence
  indices, which the rewrite used to miss (a KeyError)."""
  encoder = nnx.Linear(3, 3, rngs=nnx.Rngs(0))
  flow = frn.FlowMLP(3, 2, rngs=nnx.Rngs(1))
  x = jax.random.normal(jax.random.PRNGKey(0), (8, 3))
  as_tuple = frn.value_and_relative_grad(lambda ms, x: nll(ms[1], ms[0](x)))((encoder, flow), x)
  as_dict = frn.value_and_relative_grad(lambda ms, x: nll(ms["flow"], ms["encoder"](x)))(
    {"encoder": encoder, "flow": flow}, x
  )
  np.testing.assert_allclose(as_tuple[0], as_dict[0], rtol=1e-6)
  tuple_grads = [g[...] for g in jax.tree.leaves(as_tuple[1])]
  dict_grads = [g[...] for g in jax.tree.leaves((as_dict[1]["encoder"], as_dict[1]["flow"]))]
  for got, want in zip(tuple_grads, dict_grads, strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
