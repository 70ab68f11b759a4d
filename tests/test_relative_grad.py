"""The general entry point on models of every kind, against brute force in float64.

For each model, the update of every flow layer must equal Ŵ Ŵᵀ Ĝ, with Ĝ the autodiff
gradient of the full exact loss (every log|det W| term included, through `slogdet`), and
every other leaf must equal its autodiff gradient.
"""

import functools
import math

import flax.linen as nn
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import flax_relgrad as fr
from conftest import brute_force_relative_gradient
from conftest import enable_x64
from conftest import perturb_params
from conftest import perturbed_init

F64 = jnp.float64


def gaussian_log_prob(z, loc, log_scale):
  """Σ_i log N(z_i; loc_i, exp(log_scale_i)²) over the last axis."""
  return fr.standard_normal_log_prob((z - loc) * jnp.exp(-log_scale)) - log_scale.sum()


class FlowWithLearnedBase(nn.Module):
  """A FlowMLP followed by a learned diagonal Gaussian base density."""

  @nn.compact
  def log_prob(self, x):
    z, log_det = fr.FlowMLP(
      2, fr.SmoothLeakyReLU(0.2), param_dtype=F64, name="flow"
    ).forward_and_log_det(x)
    loc = self.param("loc", nn.initializers.zeros, x.shape[-1:], F64)
    log_scale = self.param("log_scale", nn.initializers.zeros, x.shape[-1:], F64)
    return gaussian_log_prob(z, loc, log_scale) + log_det


class TwoFlows(nn.Module):
  """Two flows composed, with an ordinary elementwise affine layer between them."""

  @nn.compact
  def log_prob(self, x):
    z, first = fr.FlowMLP(2, fr.SmoothLeakyReLU(0.3), param_dtype=F64).forward_and_log_det(x)
    log_scale = self.param("log_scale", nn.initializers.zeros, x.shape[-1:], F64)
    z = z * jnp.exp(log_scale) + self.param("shift", nn.initializers.zeros, x.shape[-1:], F64)
    z, second = fr.FlowMLP(1, param_dtype=F64, use_bias=False).forward_and_log_det(z)
    return fr.standard_normal_log_prob(z) + first + log_scale.sum() + second


class SequenceFlow(nn.Module):
  """A FlowMLP applied per position of a (B, T, D) sequence; log p sums the T positions."""

  @nn.compact
  def log_prob(self, x):
    return fr.FlowMLP(2, fr.SmoothLeakyReLU(0.2), param_dtype=F64).log_prob(x).sum(-1)


class Glow1x1(nn.Module):
  """Two invertible 1×1 convolutions of (B, H, W, C) images with an activation between."""

  @nn.compact
  def log_prob(self, x):
    activation = fr.SmoothLeakyReLU(0.2)
    y, log_det = fr.FlowDense(param_dtype=F64).forward_and_log_det(x, event_ndims=3)
    log_det = log_det + activation.log_derivative(y).sum((1, 2, 3))
    z, second = fr.FlowDense(param_dtype=F64).forward_and_log_det(activation(y), event_ndims=3)
    return fr.standard_normal_log_prob(z).sum((1, 2)) + log_det + second


Ensemble = nn.vmap(
  fr.FlowMLP,
  variable_axes={"params": 0, "intermediates": 0, "perturbations": 0},
  split_rngs={"params": True},
  in_axes=None,
  axis_size=3,
  methods=["log_prob"],
)


class ScanStep(nn.Module):
  """One step of a recurrence: the same flow maps x_t, with a carry it does not use."""

  @nn.compact
  def __call__(self, carry, x_t):
    return carry, fr.FlowMLP(2, fr.SmoothLeakyReLU(0.2), param_dtype=F64).log_prob(x_t)


class SharedFlowOverTime(nn.Module):
  """nn.scan over T of (B, T, D) with the flow's params broadcast: one flow for every step."""

  @nn.compact
  def log_prob(self, x):
    scan = nn.scan(
      ScanStep,
      variable_broadcast="params",
      split_rngs={"params": False},
      variable_axes={"intermediates": 0, "perturbations": 0},
      in_axes=1,
      out_axes=1,
    )
    return scan()(jnp.zeros(()), x)[1].sum(-1)


def conditional(use_bias):
  conditioner = nn.Sequential([nn.Dense(6, param_dtype=F64), nn.tanh])
  return fr.ConditionalFlowMLP(
    2, conditioner, fr.SmoothLeakyReLU(0.2), use_bias=use_bias, param_dtype=F64
  )


def mean_nll(module, *args):
  return -jnp.mean(module.log_prob(*args))


def relative_updates(model, loss_fn, params, *args, **options):
  return jax.jit(fr.value_and_relative_grad(model, loss_fn, **options))(params, *args)


def flow_layer_paths(model, loss_fn, params, *args):
  """Paths of the flow layers the loss applies (from what they sow in a plain apply)."""
  apply = functools.partial(model.apply, method=loss_fn, mutable=["intermediates"])
  sown = jax.jit(apply)({"params": params}, *args)[1]
  return sorted(
    {
      path[:-1]
      for path in flax.traverse_util.flatten_dict(sown["intermediates"])
      if path[-1] == fr.PREACTIVATION
    }
  )


def check_against_brute_force(model, params, *args, loss_fn=mean_nll):
  """Max relative error of the flow layers' updates; asserts the other leaves are exact."""
  _, updates = relative_updates(model, loss_fn, params, *args)
  exact = jax.jit(jax.grad(lambda p: model.apply({"params": p}, *args, method=loss_fn)))(params)
  flat_params = flax.traverse_util.flatten_dict(params)
  flat_updates = flax.traverse_util.flatten_dict(updates)
  flat_exact = flax.traverse_util.flatten_dict(exact)
  layers = flow_layer_paths(model, loss_fn, params, *args)
  errors = []
  for layer in layers:
    kernel = flat_params[layer + ("kernel",)]
    bias = flat_params.get(layer + ("bias",))
    for index in np.ndindex(kernel.shape[:-2]):  # each kernel of an nn.vmap stack
      expected_kernel, expected_bias = brute_force_relative_gradient(
        kernel[index],
        None if bias is None else bias[index],
        flat_exact[layer + ("kernel",)][index],
        None if bias is None else flat_exact[layer + ("bias",)][index],
      )
      scale = jnp.max(jnp.abs(expected_kernel))
      errors.append(
        float(jnp.max(jnp.abs(flat_updates[layer + ("kernel",)][index] - expected_kernel)) / scale)
      )
      if bias is not None:
        error = jnp.abs(flat_updates[layer + ("bias",)][index] - expected_bias)
        errors.append(float(jnp.max(error) / jnp.max(jnp.abs(expected_bias))))
  others = [path for path in flat_params if path[:-1] not in layers]
  for path in others:
    np.testing.assert_allclose(flat_updates[path], flat_exact[path], rtol=1e-12, atol=1e-15)
  return layers, others, max(errors)


def init(model, *args, method="log_prob", seed=0):
  return perturbed_init(model, *args, seed=seed, method=method)


def normal(seed, shape):
  return jax.random.normal(jax.random.PRNGKey(seed), shape, F64)


CASES = {
  "flow_and_learned_base": lambda: (FlowWithLearnedBase(), (normal(1, (7, 4)),), 2, 2),
  "flowmlp_diagonal_gaussian_base": lambda: (
    fr.FlowMLP(2, fr.SmoothLeakyReLU(0.2), param_dtype=F64, base="diagonal_gaussian"),
    (normal(8, (7, 4)),),
    2,
    2,
  ),
  "flowmlp_splines": lambda: (  # 3 splines × (widths, heights, derivatives) + the base
    fr.FlowMLP(
      3,
      fr.SmoothLeakyReLU(0.2),
      param_dtype=F64,
      base="diagonal_gaussian",
      spline_bins=4,
      spline_bound=1.5,
    ),
    (normal(9, (7, 4)),),
    3,
    11,
  ),
  "flowmlp_spline_on_input": lambda: (  # one spline × (widths, heights, derivatives)
    fr.FlowMLP(
      3,
      fr.SmoothLeakyReLU(0.2),
      param_dtype=F64,
      spline_bins=4,
      spline_bound=1.5,
      spline_placement="input",
    ),
    (normal(11, (7, 4)),),
    3,
    3,
  ),
  "two_flows": lambda: (TwoFlows(), (normal(2, (6, 3)),), 3, 2),
  "conditional_with_bias": lambda: (
    conditional(True),
    (normal(3, (9, 3)), normal(4, (9, 2))),
    2,
    4,
  ),
  "conditional_without_bias": lambda: (
    conditional(False),
    (normal(3, (9, 3)), normal(4, (9, 2))),
    2,
    4,
  ),
  "sequence_btd": lambda: (SequenceFlow(), (normal(5, (4, 6, 3)),), 2, 0),
  "image_1x1_conv": lambda: (Glow1x1(), (normal(6, (2, 5, 4, 3)),), 2, 0),
  "vmap_ensemble": lambda: (Ensemble(2, param_dtype=F64), (normal(7, (8, 3)),), 2, 0),
  "scan_broadcast_params": lambda: (SharedFlowOverTime(), (normal(10, (5, 4, 3)),), 2, 0),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_update_equals_brute_force(float64, case):
  model, args, num_flow_layers, num_other_leaves = CASES[case]()
  params = init(model, *args)
  layers, others, error = check_against_brute_force(model, params, *args)
  assert len(layers) == num_flow_layers and len(others) == num_other_leaves
  print(f"{case}: max relative error {error:.1e}")
  assert error < 1e-10


def test_log_det_weight_comes_from_the_loss(float64):
  """A batch sum is B times a batch mean; a loss that counts the log-det T times per example
  (a sequence) differs from one that counts it once: both come out exact without a weight."""
  model = fr.FlowMLP(2, param_dtype=F64)
  x = normal(0, (6, 4))
  params = init(model, x)
  _, mean = relative_updates(model, mean_nll, params, x)
  _, summed = relative_updates(model, lambda m, x: -m.log_prob(x).sum(), params, x)
  for a, b in zip(jax.tree_util.tree_leaves(summed), jax.tree_util.tree_leaves(mean), strict=True):
    np.testing.assert_allclose(a, 6.0 * b, rtol=1e-12)
  # A sequence model counts each layer's log|det W| T = 5 times per example.
  sequences = normal(1, (2, 5, 4))
  params = init(SequenceFlow(), sequences)
  _, per_sequence = relative_updates(SequenceFlow(), mean_nll, params, sequences)
  _, per_vector = relative_updates(
    SequenceFlow(), lambda m, x: -m.log_prob(x).mean() / 5, params, sequences
  )
  for a, b in zip(
    jax.tree_util.tree_leaves(per_sequence), jax.tree_util.tree_leaves(per_vector), strict=True
  ):
    np.testing.assert_allclose(a, 5.0 * b, rtol=1e-12)


def test_nonlinear_loss_needs_exact_loss(float64):
  """A mixture of two flows is not affine in the log-likelihoods: with `exact_loss` the update is
  exact and the returned loss is the exact NLL; without it, the log-dets enter as 0."""

  class Mixture(nn.Module):
    @nn.compact
    def log_prob(self, x):
      first = fr.FlowMLP(1, param_dtype=F64).log_prob(x)
      second = fr.FlowMLP(2, param_dtype=F64).log_prob(x)
      return jnp.logaddexp(first, second) - math.log(2.0)

  model, x = Mixture(), normal(3, (10, 3))
  params = init(model, x, seed=4)
  exact_nll = -jnp.mean(model.apply({"params": params}, x, method="log_prob"))
  value, updates = fr.value_and_relative_grad(model, mean_nll, exact_loss=True)(params, x)
  np.testing.assert_allclose(value, exact_nll, rtol=1e-13)
  value_without, _ = fr.value_and_relative_grad(model, mean_nll)(params, x)
  assert abs(float(value_without - exact_nll)) > 0.1
  exact = jax.grad(lambda p: model.apply({"params": p}, x, method=mean_nll))(params)
  for layer in ("FlowMLP_0", "FlowMLP_1"):
    for name, layer_params in params[layer].items():
      expected = brute_force_relative_gradient(
        layer_params["kernel"],
        layer_params["bias"],
        exact[layer][name]["kernel"],
        exact[layer][name]["bias"],
      )
      np.testing.assert_allclose(
        updates[layer][name]["kernel"], expected[0], rtol=1e-10, atol=1e-12
      )
      np.testing.assert_allclose(updates[layer][name]["bias"], expected[1], rtol=1e-10, atol=1e-12)


def flow_kernels_and_biases(module):
  """Every kernel and bias leaf the module holds (read directly from its params)."""
  flat = flax.traverse_util.flatten_dict(module.variables["params"])
  return [leaf for path, leaf in flat.items() if path[-1] in ("kernel", "bias")]


DIRECT_READS = {
  # An L2 penalty on every W and b, written in the loss instead of the optimizer.
  "l2_penalty": lambda m, *args: (
    mean_nll(m, *args) + 0.3 * sum(jnp.sum(leaf**2) for leaf in flow_kernels_and_biases(m))
  ),
  # An orthogonality penalty ‖WᵀW − I‖², which ⟨G, W⟩ alone could miss.
  "orthogonality_penalty": lambda m, *args: (
    mean_nll(m, *args)
    + 0.1
    * sum(
      jnp.sum((jnp.swapaxes(k, -1, -2) @ k - jnp.eye(k.shape[-1])) ** 2)
      for k in flow_kernels_and_biases(m)
      if k.ndim >= 2
    )
  ),
  # A weight tied to another use: the first kernel also decodes the data.
  "tied_weight": lambda m, x, *args: mean_nll(m, x, *args) + tied_reconstruction(m, x),
}


def tied_reconstruction(module, x):
  """‖x W Wᵀ − x‖² with the first flow kernel W (of x's width) used a second time."""
  kernel = next(k for k in flow_kernels_and_biases(module) if k.shape[-2:] == (x.shape[-1],) * 2)
  return jnp.mean((x @ kernel @ jnp.swapaxes(kernel, -1, -2) - x) ** 2)


@pytest.mark.parametrize(
  "case, reads",
  [
    ("flowmlp_splines", "l2_penalty"),
    ("conditional_without_bias", "orthogonality_penalty"),
    ("vmap_ensemble", "tied_weight"),
    ("scan_broadcast_params", "l2_penalty"),
  ],
)
def test_loss_that_reads_flow_params_directly_gets_their_exact_relative_gradient(
  float64, case, reads
):
  """What the loss does with W and b besides the layer (a penalty, a tied weight) is part of
  Ĝ: its Ŵ Ŵᵀ Ĝ term is added to the update from y, δ and λ, so the result stays exact."""
  model, args, _, _ = CASES[case]()
  params = init(model, *args)
  loss_fn = DIRECT_READS[reads]
  _, _, error = check_against_brute_force(model, params, *args, loss_fn=loss_fn)
  print(f"{case}, {reads}: max relative error {error:.1e}")
  assert error < 1e-10
  # Without the added term the update would differ from brute force by much more.
  _, plain = relative_updates(model, mean_nll, params, *args)
  _, penalised = relative_updates(model, loss_fn, params, *args)
  differences = [
    float(jnp.max(jnp.abs(a - b)))
    for a, b in zip(
      jax.tree_util.tree_leaves(plain), jax.tree_util.tree_leaves(penalised), strict=True
    )
  ]
  assert max(differences) > 1e-3


@pytest.mark.parametrize(
  "case",
  ["flowmlp_splines", "conditional_with_bias", "vmap_ensemble", "scan_broadcast_params"],
)
def test_relative_jacobian_equals_value_and_relative_grad(float64, case):
  """The Optax transform on the pass's Euclidean gradient and relative args gives the same
  update as value_and_relative_grad for every kind of model (stand-ins summed over the steps
  of a layer shared by nn.scan, one per kernel of an nn.vmap stack), here with a loss that
  also reads the flow params directly (an L2 penalty)."""
  model, args, _, _ = CASES[case]()
  params = init(model, *args)
  loss_fn = DIRECT_READS["l2_penalty"]

  @jax.jit
  def through_the_transform(params, *args):
    _, grads, relative_args = fr.value_grad_and_relative_args(model, loss_fn)(params, *args)
    updates, _ = fr.relative_jacobian().update(
      grads, optax.EmptyState(), params, relative_args=relative_args
    )
    return updates

  _, expected = relative_updates(model, loss_fn, params, *args)
  updates = through_the_transform(params, *args)
  for path, leaf in flax.traverse_util.flatten_dict(updates).items():
    np.testing.assert_allclose(
      leaf,
      flax.traverse_util.flatten_dict(expected)[path],
      rtol=1e-12,
      atol=1e-13,
      err_msg=str(path),
    )


class StackOfSharedOverTime(nn.Module):
  """nn.vmap (params on axis 0) around an nn.scan that broadcasts its params: a layout the
  relative-gradient bookkeeping does not support."""

  @nn.compact
  def log_prob(self, x):
    stack = nn.vmap(
      SharedFlowOverTime,
      variable_axes={"params": 0, "intermediates": 0, "perturbations": 0},
      split_rngs={"params": True},
      in_axes=None,
      axis_size=2,
      methods=["log_prob"],
    )
    return stack().log_prob(x).sum(0)


def test_stacked_around_shared_over_time_is_refused_by_both_passes(float64):
  """Before, value_grad_and_relative_args summed the stand-ins' gradients over the stack's
  axis when the two sizes agreed (T = E = 2), with no error."""
  model, x = StackOfSharedOverTime(), jnp.ones((4, 2, 3), F64)
  params = model.init(jax.random.PRNGKey(0), x, method="log_prob")["params"]
  for make in (fr.value_and_relative_grad, fr.value_grad_and_relative_args):
    with pytest.raises(ValueError, match="use axis 0 for 'params', 'intermediates'"):
      make(model, mean_nll)(params, x)


def test_has_aux_rngs_kwargs_and_layer_called_twice(float64):
  """aux and keyword args pass through; a layer applied to two batches of different sizes gets
  the update of the sum of both terms."""

  class Shared(nn.Module):
    @nn.compact
    def log_prob(self, x, other, *, weight):
      flow = fr.FlowMLP(2, param_dtype=F64)
      noise = jax.random.normal(self.make_rng("noise"), x.shape, F64)
      return flow.log_prob(x + 0.0 * noise).mean() + weight * flow.log_prob(other).mean()

  def loss_fn(module, x, other, weight):
    log_prob = module.log_prob(x, other, weight=weight)
    return -log_prob, {"log_prob": log_prob}

  model = Shared()
  x, other = normal(0, (5, 3)), normal(1, (8, 3))
  rngs = {"noise": jax.random.PRNGKey(0)}
  params = perturb_params(
    model.init({"params": jax.random.PRNGKey(0), **rngs}, x, other, weight=0.5, method="log_prob")[
      "params"
    ],
    1,
  )
  (loss, aux), updates = fr.value_and_relative_grad(model, loss_fn, has_aux=True)(
    params, x, other, 0.5, rngs=rngs
  )
  assert float(loss) == -float(aux["log_prob"])
  exact = jax.grad(
    lambda p: model.apply(
      {"params": p}, x, other, 0.5, method=lambda m, *a: loss_fn(m, *a)[0], rngs=rngs
    )
  )(params)
  for name, layer in params["FlowMLP_0"].items():
    expected = brute_force_relative_gradient(
      layer["kernel"],
      layer["bias"],
      exact["FlowMLP_0"][name]["kernel"],
      exact["FlowMLP_0"][name]["bias"],
    )
    np.testing.assert_allclose(
      updates["FlowMLP_0"][name]["kernel"], expected[0], rtol=1e-10, atol=1e-12
    )


def test_jit_any_batch_size_and_init_batch_irrelevant():
  model = FlowWithLearnedBase()
  with enable_x64(True):
    params = model.init(jax.random.PRNGKey(0), jnp.ones((1, 3), F64), method="log_prob")["params"]
    grad_fn = jax.jit(fr.value_and_relative_grad(model, mean_nll))
    for batch in (1, 4, 33):
      loss, grads = grad_fn(params, normal(batch, (batch, 3)))
      assert grads["flow"]["layers_0"]["kernel"].shape == (3, 3) and np.isfinite(float(loss))


# --- Training parity ---------------------------------------------------------------------


def train(model, params, data, method, steps=1500):
  tx = optax.adam(1e-2)
  opt_state = tx.init(params)
  relative = fr.value_and_relative_grad(model, mean_nll)

  @jax.jit
  def step(params, opt_state, x):
    if method == "relative":
      _, grads = relative(params, x)
    else:
      grads = jax.grad(lambda p: model.apply({"params": p}, x, method=mean_nll))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  for index in range(steps):
    params, opt_state = step(params, opt_state, data[(index % 30) * 100 : (index % 30 + 1) * 100])
  return params


def test_training_parity_with_autodiff_slogdet():
  """Flow + learned base on a skewed 4-D density: both paths reach the same held-out NLL."""
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  mixing = jnp.array([[1.0, 0.5, 0, 0], [0, 0.3, 0.2, 0], [0.4, 0, 2.0, 0], [0, 0, 0.5, 0.7]])
  draw = lambda key: (jax.random.gamma(key, 2.0, (3000, 4)) - 2.0) @ mixing + 3.0
  data, held_out = draw(keys[0]), draw(keys[1])
  model = FloatFlowWithLearnedBase()
  params = model.init(keys[2], data[:2], method="log_prob")["params"]
  nll = {}
  for method in ("relative", "slogdet"):
    trained = train(model, params, data, method)
    nll[method] = (
      -float(jnp.mean(model.apply({"params": trained}, held_out, method="log_prob"))) / 4
    )
  print(f"held-out NLL per dim: {nll}")
  assert abs(nll["relative"] - nll["slogdet"]) < 0.02


class FloatFlowWithLearnedBase(nn.Module):
  """FlowWithLearnedBase in float32, for training."""

  @nn.compact
  def log_prob(self, x):
    z, log_det = fr.FlowMLP(2, fr.SmoothLeakyReLU(0.3), name="flow").forward_and_log_det(x)
    loc = self.param("loc", nn.initializers.zeros, x.shape[-1:])
    log_scale = self.param("log_scale", nn.initializers.zeros, x.shape[-1:])
    return gaussian_log_prob(z, loc, log_scale) + log_det


def test_unclear_transform_errors_become_clear():
  """A raw jax.lax.scan over a flow, and nn.vmap with the collections on axis 1, get errors
  that say what to do instead of Flax's UnexpectedTracerError and "axis 1 is out of bounds"."""

  class RawScan(nn.Module):
    def setup(self):
      self.flow = fr.FlowMLP(1)

    def log_prob(self, x):
      return jax.lax.scan(lambda c, x_t: (c, self.flow.log_prob(x_t)), 0.0, jnp.swapaxes(x, 0, 1))[
        1
      ].sum(0)

    def first_step_log_prob(self, x):  # Initialised outside the scan (older Flax refuses it).
      return self.flow.log_prob(x[:, 0])

  axis_one = nn.vmap(
    fr.FlowMLP,
    variable_axes={"params": 1, "intermediates": 1, "perturbations": 1},
    split_rngs={"params": True},
    in_axes=None,
    axis_size=2,
    methods=["log_prob"],
  )
  for model, x, init_method, message in (
    (RawScan(), jnp.ones((4, 3, 2)), "first_step_log_prob", "inside a raw jax.lax.scan"),
    (axis_one(1), jnp.ones((4, 2)), "log_prob", "'perturbations' on axis 0"),
  ):
    params = model.init(jax.random.PRNGKey(0), x, method=init_method)["params"]
    with pytest.raises(ValueError, match=message):
      fr.value_and_relative_grad(model, mean_nll)(params, x)


class _Penalised(nn.Module):
  """A flow and the losses with which helpers trying the API got a wrong relative gradient
  without an error; each is now refused."""

  def setup(self):
    self.flow = fr.FlowMLP(2, fr.SmoothLeakyReLU(0.5))

  def log_prob(self, x):
    return self.flow.log_prob(x)

  def lifted_grad_penalty(self, x):  # a score penalty through Flax's lifted nn.grad
    score = nn.grad(lambda flow, x: flow.log_prob(x).sum(), self.flow, x)[0]
    return -self.log_prob(x).mean() + 0.1 * (score**2).sum(-1).mean()

  def lifted_vjp_penalty(self, x):
    log_p, vjp = nn.vjp(lambda flow, x: flow.log_prob(x), self.flow, x)
    score = vjp(jnp.ones_like(log_p))[1]
    return -log_p.mean() + 0.1 * (score**2).sum(-1).mean()

  def lifted_jvp_penalty(self, x):
    zero = {"params": jax.tree_util.tree_map(jnp.zeros_like, self.flow.variables["params"])}
    log_p, tangent = nn.jvp(
      lambda flow, x: flow.log_prob(x), self.flow, (x,), (jnp.ones_like(x),), zero
    )
    return -log_p.mean() + 0.1 * (tangent**2).mean()

  def raw_grad_penalty(self, x):
    score = jax.grad(lambda x: self.log_prob(x).sum())(x)
    return -self.log_prob(x).mean() + 0.1 * (score**2).sum(-1).mean()


class _MappedFlow(nn.Module):
  """A flow applied under nn.map_variables with `map_in` on `collection`."""

  map_in: object
  collection: str = "params"

  @nn.compact
  def log_prob(self, x):
    mapped = nn.map_variables(
      fr.FlowMLP,
      self.collection,
      trans_in_fn=self.map_in,
      init=self.is_initializing(),
      methods=["log_prob"],
    )
    return mapped(2, name="flow").log_prob(x)


def test_losses_that_would_get_a_wrong_relative_gradient_are_refused():
  """Each of these losses got an update far from Ŵ Ŵᵀ Ĝ (18–75 % off) without an error:
  a nested model.apply or model.bind in the loss, differentiation through the flow (Flax's
  lifted nn.grad, nn.vjp, nn.jvp, or jax.grad), and nn.map_variables that changes the
  params (a frozen copy got a non-zero update)."""
  x = jax.random.normal(jax.random.PRNGKey(0), (8, 3))
  model = _Penalised()
  params = perturbed_init(model, x, seed=1, method="log_prob")
  log_p = jax.jit(lambda variables, x: model.apply(variables, x, method="log_prob"))

  recording = lambda variables, x, mutable: model.apply(
    variables, x, method="log_prob", mutable=mutable
  )[0]
  cases = [
    (lambda m, x: -m.log_prob(x).mean() - log_p(m.variables, 2 * x).mean(), "nested model.apply"),
    (lambda m, x: -model.bind(m.variables).log_prob(x).mean(), "nested model.apply"),
    (lambda m, x: -recording(m.variables, x, ["intermediates"]).mean(), "nested model.apply"),
    (lambda m, x: -recording(m.variables, x, True).mean(), "nested model.apply"),
    (
      lambda m, x: (
        -m.log_prob(x).mean()
        - model.bind(m.variables, mutable=["intermediates"]).log_prob(2 * x).mean()
      ),
      "nested model.apply",
    ),
  ]
  for method in ("lifted_grad", "lifted_vjp", "lifted_jvp", "raw_grad"):
    cases.append((getattr(_Penalised, f"{method}_penalty"), "differentiates through flow layer"))
  for loss_fn, message in cases:
    with pytest.raises(ValueError, match=message):
      fr.value_and_relative_grad(model, loss_fn)(params, x)

  for map_in in (jax.lax.stop_gradient, lambda v: jax.tree_util.tree_map(lambda a: 2 * a, v)):
    mapped = _MappedFlow(map_in)
    mapped_params = perturbed_init(mapped, x, seed=2, method="log_prob")
    with pytest.raises(ValueError, match="under nn.map_variables that maps its params"):
      fr.value_and_relative_grad(mapped, mean_nll)(mapped_params, x)


@pytest.mark.parametrize("collection", ["params", "batch_stats"])
def test_maps_that_leave_the_flow_params_alone_stay_exact(collection):
  """nn.map_variables of another collection, or of 'params' that leaves the flow's leaves as
  they are, is not refused: the relative gradient is still Ŵ Ŵᵀ Ĝ (float64)."""
  with enable_x64():
    x = jax.random.normal(jax.random.PRNGKey(0), (8, 3), jnp.float64)
    model = _MappedFlow(lambda v: v, collection=collection)
    params = jax.tree_util.tree_map(
      lambda a: a.astype(jnp.float64), perturbed_init(model, x, seed=3, method="log_prob")
    )
    _, grads = fr.value_and_relative_grad(model, mean_nll)(params, x)
    exact = jax.grad(lambda p: model.apply({"params": p}, x, method=mean_nll))(params)
    for name in ("layers_0", "layers_1"):
      layer, layer_grad = params["flow"][name], exact["flow"][name]
      kernel, bias = brute_force_relative_gradient(
        layer["kernel"], layer["bias"], layer_grad["kernel"], layer_grad["bias"]
      )
      np.testing.assert_allclose(grads["flow"][name]["kernel"], kernel, rtol=1e-12, atol=1e-14)
      np.testing.assert_allclose(grads["flow"][name]["bias"], bias, rtol=1e-12, atol=1e-14)


def test_differentiating_through_the_relative_gradient_is_refused():
  """jax.grad or jax.jvp through a step that uses the relative gradient (meta-learning) got
  wrong derivatives, because the pass reads W and b through stop_gradient; now they raise,
  also under jit and through value_grad_and_relative_args. The step itself still runs."""
  x = jax.random.normal(jax.random.PRNGKey(0), (8, 3))
  model = fr.FlowMLP(2)
  params = perturbed_init(model, x, seed=4)
  relative = fr.value_and_relative_grad(model, mean_nll)
  with_args = fr.value_grad_and_relative_args(model, mean_nll)
  tx = optax.chain(fr.relative_jacobian(), optax.sgd(0.1))

  def validation_after_step(p):
    grads = relative(p, x)[1]
    stepped = jax.tree_util.tree_map(lambda a, g: a - 0.1 * g, p, grads)
    return model.apply({"params": stepped}, x, method=mean_nll)

  def validation_after_transform(p):
    _, grads, relative_args = with_args(p, x)
    updates, _ = tx.update(grads, tx.init(p), p, relative_args=relative_args)
    return model.apply({"params": optax.apply_updates(p, updates)}, x, method=mean_nll)

  np.testing.assert_allclose(
    validation_after_step(params), validation_after_transform(params), rtol=1e-5
  )
  tangents = jax.tree_util.tree_map(jnp.ones_like, params)
  for differentiate in (
    lambda: jax.grad(validation_after_step)(params),
    lambda: jax.grad(jax.jit(validation_after_step))(params),
    lambda: jax.jvp(lambda p: relative(p, x)[1], (params,), (tangents,)),
    lambda: jax.grad(lambda p: relative(p, x)[0])(params),
    lambda: jax.grad(validation_after_transform)(params),
    lambda: jax.grad(lambda p: with_args(p, x)[1]["layers_0"]["kernel"].sum())(params),
  ):
    with pytest.raises(ValueError, match="its result is being differentiated"):
      differentiate()


_SHARED_SCAN = dict(
  variable_broadcast="params",
  variable_axes={"intermediates": 0, "perturbations": 0},
  split_rngs={"params": False},
  in_axes=1,
  out_axes=1,
)


class _Branches(nn.Module):
  """nn.cond between two uses of one flow; with `closed_over`, the branches apply the flow
  they close over instead of the module nn.cond passes them."""

  closed_over: bool = False

  @nn.compact
  def __call__(self, x, pred=True):
    flow = fr.FlowMLP(1, name="flow")
    if self.is_initializing():
      return flow.log_prob(x)
    if self.closed_over:
      branches = (lambda _, x: flow.log_prob(x), lambda _, x: flow.log_prob(2 * x))
      return nn.cond(pred, *branches, self, x)
    return nn.cond(pred, lambda f, x: f.log_prob(x), lambda f, x: f.log_prob(2 * x), flow, x)


class _ScannedAndOutside(nn.Module):
  outside_first: bool

  def setup(self):
    self.flow = fr.FlowMLP(1)

  def __call__(self, xs):
    scan = nn.scan(lambda f, c, x_t: (c, f.log_prob(x_t)), **_SHARED_SCAN)
    if self.outside_first:
      outside = self.flow.log_prob(xs[:, 0])
      return outside + scan(self.flow, 0.0, xs[:, 1:])[1].sum(-1)
    inside = scan(self.flow, 0.0, xs[:, 1:])[1].sum(-1)
    return inside + self.flow.log_prob(xs[:, 0])


class _TwoScans(nn.Module):
  def setup(self):
    self.flow = fr.FlowMLP(1)

  def __call__(self, xs):
    scan = nn.scan(lambda f, c, x_t: (c, f.log_prob(x_t)), **_SHARED_SCAN)
    return scan(self.flow, 0.0, xs[:, :1])[1].sum(-1) + scan(self.flow, 0.0, xs[:, 1:])[1].sum(-1)


def test_flows_in_branches_or_in_scans_of_two_shapes_get_errors_that_say_what_to_do():
  """nn.cond between flows said "raw jax.lax.scan"; one flow inside nn.scan and outside it, or
  in two scans of different lengths, raised Flax's IndexError or "different leading axis
  sizes". Each now says what to do."""
  x, xs = jnp.ones((5, 2)), jax.random.normal(jax.random.PRNGKey(0), (5, 4, 2))
  for model, inputs, message in (
    (_Branches(closed_over=True), x, "a branch of nn.cond or nn.switch"),
    (_ScannedAndOutside(False), xs, "both inside and outside nn.scan"),
    (_ScannedAndOutside(True), xs, "both inside and outside nn.scan"),
    (_TwoScans(), xs, "in two of them of different lengths"),
  ):
    params = model.init(jax.random.PRNGKey(1), inputs)["params"]
    with pytest.raises(ValueError, match=message):
      fr.value_and_relative_grad(model, lambda m, x: -m(x).mean())(params, inputs)


def test_a_flow_passed_to_nn_cond_is_exact():
  """A flow passed to nn.cond as its module gets Ŵ Ŵᵀ Ĝ of the branch taken (float64);
  under jit the predicate may be traced."""
  with enable_x64():
    x = jax.random.normal(jax.random.PRNGKey(0), (8, 2), jnp.float64)
    model = _Branches()
    params = jax.tree_util.tree_map(
      lambda a: a.astype(jnp.float64), perturbed_init(model, x, seed=5)
    )
    loss = lambda m, x, pred: -m(x, pred).mean()
    grad_fn = jax.jit(fr.value_and_relative_grad(model, loss))
    for pred in (True, False):
      _, grads = grad_fn(params, x, jnp.asarray(pred))
      exact = jax.grad(lambda p, pred=pred: model.apply({"params": p}, x, pred, method=loss))(
        params
      )
      layer, layer_grad = params["flow"]["layers_0"], exact["flow"]["layers_0"]
      kernel, bias = brute_force_relative_gradient(
        layer["kernel"], layer["bias"], layer_grad["kernel"], layer_grad["bias"]
      )
      np.testing.assert_allclose(grads["flow"]["layers_0"]["kernel"], kernel, rtol=1e-12)
      np.testing.assert_allclose(grads["flow"]["layers_0"]["bias"], bias, rtol=1e-12)
