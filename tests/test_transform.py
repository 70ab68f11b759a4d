"""`relative_jacobian()`, the Optax transform, against `value_and_relative_grad` and its misuses.

Each misuse that could make the transform silently wrong must raise an error that names the
fix; a runtime check raises through JAX's callback machinery (JaxRuntimeError, XlaRuntimeError
on old jax), hence `pytest.raises(Exception, match=...)` for those.
"""

import re

import flax.linen as nn
from flax.training import train_state
import flax.traverse_util
import jax
import jax.numpy as jnp
import optax
import pytest

import flax_relgrad as fr
from conftest import HAS_NNX
from conftest import brute_force_relative_gradient
from conftest import enable_x64
from conftest import random_flow_params

MISMATCH = "received gradients that differ from those its relative_args were made with"


def flow_and_data(dtype=jnp.float32, use_bias=True, spline_bins=0, seed=0):
  model = fr.FlowMLP(
    2,
    fr.SmoothLeakyReLU(0.2),
    use_bias=use_bias,
    param_dtype=dtype,
    base="diagonal_gaussian",
    spline_bins=spline_bins,
    spline_bound=3.0,
  )
  params = random_flow_params(model, 4, seed)
  x = jax.random.normal(jax.random.PRNGKey(seed + 10), (32, 4), dtype)
  return model, params, x


def chain_steps(model, params, batches, tx, loss_fn=fr.nll):
  grad_fn = fr.value_grad_and_relative_args(model, loss_fn)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, x):
    _, grads, relative_args = grad_fn(params, x)
    updates, opt_state = tx.update(grads, opt_state, params, relative_args=relative_args)
    return optax.apply_updates(params, updates), opt_state

  for x in batches:
    params, opt_state = step(params, opt_state, x)
  return params


def direct_steps(model, params, batches, tx, loss_fn=fr.nll):
  grad_fn = fr.value_and_relative_grad(model, loss_fn)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, x):
    _, grads = grad_fn(params, x)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  for x in batches:
    params, opt_state = step(params, opt_state, x)
  return params


def max_difference(a, b):
  return max(
    jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda u, v: jnp.abs(u - v).max(), a, b))
  )


def test_chain_equals_value_and_relative_grad(float64):
  """Adam (then clipping after the transform, which is allowed) on the transform's output =
  the same optimizer on value_and_relative_grad's grads, over 5 steps, splines and a learned
  base included; and both differ from plain Adam on the placeholder gradients."""
  model, params, _ = flow_and_data(jnp.float64, spline_bins=4)
  batches = jax.random.normal(jax.random.PRNGKey(3), (5, 32, 4), jnp.float64)
  after = optax.chain(optax.clip_by_global_norm(0.5), optax.adam(1e-2))
  chained = chain_steps(model, params, batches, optax.chain(fr.relative_jacobian(), after))
  direct = direct_steps(model, params, batches, after)
  assert max_difference(chained, direct) < 1e-12
  assert max_difference(chained, params) > 1e-3


def test_one_rewrite_no_bias_layer_and_nnx_style_state(float64):
  """Without biases (the kernel fingerprint path) the update is the same as well."""
  model, params, x = flow_and_data(jnp.float64, use_bias=False)
  _, grads, relative_args = fr.value_grad_and_relative_args(model, fr.nll)(params, x)
  updates, _ = fr.relative_jacobian().update(
    grads, optax.EmptyState(), params, relative_args=relative_args
  )
  _, direct = fr.value_and_relative_grad(model, fr.nll)(params, x)
  assert max_difference(updates, direct) < 1e-13


def test_no_false_alarm_in_float32_training():
  """50 jitted Adam steps in float32 (learning rate large enough to move far) pass the
  check, with and without biases."""
  for use_bias in (True, False):
    model, params, _ = flow_and_data(use_bias=use_bias)
    batches = 2.0 * jax.random.normal(jax.random.PRNGKey(4), (50, 32, 4))
    trained = chain_steps(
      model, params, batches, optax.chain(fr.relative_jacobian(), optax.adam(3e-2))
    )
    assert all(bool(jnp.isfinite(leaf).all()) for leaf in jax.tree_util.tree_leaves(trained))


@pytest.mark.parametrize(
  "before",
  [
    optax.scale(0.5),
    optax.clip_by_global_norm(1e-4),
    optax.adam(1e-3),
    optax.add_decayed_weights(0.1),
    optax.add_decayed_weights(1e-5),
  ],
  ids=["scaled", "clipped", "not_first_adam", "not_first_weight_decay", "tiny_weight_decay"],
)
def test_changed_gradients_before_it_raise(before):
  model, params, x = flow_and_data()
  with pytest.raises(Exception, match=MISMATCH):
    jax.block_until_ready(
      chain_steps(model, params, x[None], optax.chain(before, fr.relative_jacobian()))
    )


def test_changes_that_leave_the_biases_alone_raise():
  """Weight decay at a fresh init (zero biases, so their leaves are unchanged), a decay or a
  scale masked to the kernels, and params other than those the grads were taken at: caught by
  the kernel fingerprint ⟨G, W⟩ = Σ (y − b)·δ."""
  model, params, x = flow_and_data()
  fresh = model.init(jax.random.PRNGKey(1), x)["params"]
  kernels = lambda tree: jax.tree_util.tree_map_with_path(lambda p, _: p[-1].key == "kernel", tree)
  for start, before in (
    (fresh, optax.add_decayed_weights(0.1)),
    (params, optax.add_decayed_weights(0.1, mask=kernels)),
    (params, optax.masked(optax.scale(0.5), kernels)),
  ):
    with pytest.raises(Exception, match=MISMATCH):
      jax.block_until_ready(
        chain_steps(model, start, x[None], optax.chain(before, fr.relative_jacobian()))
      )
  _, grads, relative_args = fr.value_grad_and_relative_args(model, fr.nll)(params, x)
  other = jax.tree_util.tree_map(lambda a: a + 0.05, params)
  with pytest.raises(Exception, match=MISMATCH):
    jax.block_until_ready(
      fr.relative_jacobian().update(grads, optax.EmptyState(), other, relative_args=relative_args)
    )


def penalised_nll(module, x):
  """The NLL plus an L2 penalty on every flow kernel and bias and the first kernel tied into a
  reconstruction term: uses of W and b besides the layers."""
  flat = flax.traverse_util.flatten_dict(module.variables["params"])
  penalty = sum(jnp.sum(leaf**2) for p, leaf in flat.items() if p[-1] in ("kernel", "bias"))
  kernel = flat[("layers_0", "kernel")]
  return fr.nll(module, x) + 0.1 * penalty + jnp.mean((x @ kernel @ kernel.T - x) ** 2)


def test_loss_that_reads_flow_params_directly_equals_value_and_relative_grad(float64):
  """The pass returns those uses' gradient in `direct_grads`, and the transform adds its
  Ŵ Ŵᵀ Ĝ term: 5 Adam steps equal value_and_relative_grad's, and differ from the NLL's."""
  model, params, _ = flow_and_data(jnp.float64, spline_bins=4)
  batches = jax.random.normal(jax.random.PRNGKey(3), (5, 32, 4), jnp.float64)
  tx = optax.adam(1e-2)
  chained = chain_steps(
    model, params, batches, optax.chain(fr.relative_jacobian(), tx), loss_fn=penalised_nll
  )
  direct = direct_steps(model, params, batches, tx, loss_fn=penalised_nll)
  assert max_difference(chained, direct) < 1e-12
  assert max_difference(direct, direct_steps(model, params, batches, tx)) > 1e-3


def test_nonfinite_gradients_pass_through_for_apply_if_finite():
  """A NaN in the batch is not a misuse: the update is non-finite, as with any optimizer, and
  optax.apply_if_finite around the chain skips the step."""
  model, params, x = flow_and_data()
  x = x.at[3, 1].set(jnp.nan)
  _, grads, relative_args = fr.value_grad_and_relative_args(model, fr.nll)(params, x)
  updates, _ = fr.relative_jacobian().update(
    grads, optax.EmptyState(), params, relative_args=relative_args
  )
  assert not all(bool(jnp.isfinite(leaf).all()) for leaf in jax.tree_util.tree_leaves(updates))
  tx = optax.apply_if_finite(optax.chain(fr.relative_jacobian(), optax.sgd(0.1)), 3)
  updates, state = tx.update(grads, tx.init(params), params, relative_args=relative_args)
  assert int(state.notfinite_count) == 1
  assert max_difference(updates, jax.tree_util.tree_map(jnp.zeros_like, params)) == 0.0


def test_bfloat16_params_no_false_alarm_and_updates_keep_their_dtype():
  """bfloat16 params: the grads are rounded to bfloat16 while δ is float32; the check allows
  for the leaf's own precision (it raised on about a fifth of such steps before), and every
  update leaf stays bfloat16, so a scanned training loop keeps its carry types."""
  model, params, _ = flow_and_data(jnp.bfloat16)
  batches = 3.0 * jax.random.normal(jax.random.PRNGKey(6), (30, 32, 4), jnp.bfloat16)
  tx = optax.chain(fr.relative_jacobian(), optax.adam(1e-2))
  grad_fn = fr.value_grad_and_relative_args(model, fr.nll)

  def step(carry, x):
    params, opt_state = carry
    _, grads, relative_args = grad_fn(params, x)
    updates, opt_state = tx.update(grads, opt_state, params, relative_args=relative_args)
    return (optax.apply_updates(params, updates), opt_state), None

  (trained, _), _ = jax.jit(lambda p: jax.lax.scan(step, (p, tx.init(p)), batches))(params)
  jax.block_until_ready(trained)
  assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(trained)} == {jnp.dtype(jnp.bfloat16)}
  assert max_difference(trained, params) > 1e-2


def test_accumulated_by_multisteps_raises():
  model, params, _ = flow_and_data()
  batches = jax.random.normal(jax.random.PRNGKey(5), (2, 32, 4))
  tx = optax.MultiSteps(optax.chain(fr.relative_jacobian(), optax.sgd(1e-2)), every_k_schedule=2)
  # Newer optax passes relative_args through MultiSteps and the check sees the accumulated
  # gradients; older optax drops them, and the error says where to put the transform.
  dropped = re.escape("put it outside, optax.chain(fr.relative_jacobian(), optax.MultiSteps")
  with pytest.raises(Exception, match=f"{MISMATCH}|{dropped}"):
    jax.block_until_ready(chain_steps(model, params, batches, tx))
  # Accumulating after the transform is exact (the relative gradient is linear) and works.
  tx = optax.chain(fr.relative_jacobian(), optax.MultiSteps(optax.sgd(1e-2), every_k_schedule=2))
  jax.block_until_ready(chain_steps(model, params, batches, tx))


def test_averaged_or_other_batch_args_raise():
  model, params, x = flow_and_data()
  grad_fn = fr.value_grad_and_relative_args(model, fr.nll)
  _, grads, relative_args = grad_fn(params, x)
  _, other_grads, other_args = grad_fn(params, x[::-1] + 1.0)
  tx = fr.relative_jacobian()
  averaged = jax.tree_util.tree_map(lambda a, b: (a + b) / 2, grads, other_grads)
  for received, args in ((averaged, relative_args), (grads, other_args)):
    with pytest.raises(Exception, match=MISMATCH):
      jax.block_until_ready(
        jax.jit(tx.update)(received, tx.init(params), params, relative_args=args)
      )


def test_missing_foreign_or_other_model_args_raise():
  model, params, x = flow_and_data()
  _, grads, relative_args = fr.value_grad_and_relative_args(model, fr.nll)(params, x)
  tx = fr.relative_jacobian()
  state = tx.init(params)
  with pytest.raises(ValueError, match="needs relative_args"):
    tx.update(grads, state, params)
  with pytest.raises(ValueError, match="needs params"):
    tx.update(grads, state, relative_args=relative_args)
  with pytest.raises(TypeError, match="must be the RelativeArgs"):
    tx.update(grads, state, params, relative_args={"preactivation": 1})
  with pytest.raises(ValueError, match="hold no flow layer"):
    tx.update(grads, state, params, relative_args=fr.RelativeArgs({}, {}, {}))
  bigger = fr.FlowMLP(3)
  bigger_params = bigger.init(jax.random.PRNGKey(0), x)["params"]
  _, _, bigger_args = fr.value_grad_and_relative_args(bigger, fr.nll)(bigger_params, x)
  with pytest.raises(ValueError, match="params hold no kernel at 'layers_2/kernel'"):
    tx.update(grads, state, params, relative_args=bigger_args)


def test_train_state_apply_gradients_names_the_fix():
  model, params, x = flow_and_data()
  state = train_state.TrainState.create(
    apply_fn=model.apply, params=params, tx=optax.chain(fr.relative_jacobian(), optax.adam(1e-3))
  )
  _, grads, _ = fr.value_grad_and_relative_args(model, fr.nll)(params, x)
  with pytest.raises(ValueError, match="TrainState.apply_gradients cannot pass them"):
    state.apply_gradients(grads=grads)


@pytest.mark.skipif(not HAS_NNX, reason="flax_relgrad.nnx needs flax >= 0.12")
@pytest.mark.parametrize("penalised", [False, True])
def test_nnx_optimizer_with_the_transform_equals_value_and_relative_grad(penalised):
  """Also for a loss with an L2 penalty on the flow's params (its direct_grads term)."""
  from flax import nnx  # pylint: disable=g-import-not-at-top

  import flax_relgrad.nnx as frn  # pylint: disable=g-import-not-at-top

  def loss_fn(model, x):
    nll = -model.log_prob(x).mean()
    if not penalised:
      return nll
    flow_params = jax.tree_util.tree_leaves(nnx.state(model.layers, nnx.Param))
    return nll + 0.1 * sum(jnp.sum(leaf**2) for leaf in flow_params)

  with enable_x64(True):
    batches = jax.random.normal(jax.random.PRNGKey(6), (3, 32, 4), jnp.float64)
    trained = []
    for use_transform in (True, False):
      model = frn.FlowMLP(4, 2, param_dtype=jnp.float64, base="diagonal_gaussian", rngs=nnx.Rngs(0))
      tx = optax.adam(1e-2)
      if use_transform:
        optimizer = nnx.Optimizer(model, optax.chain(fr.relative_jacobian(), tx), wrt=nnx.Param)
        grad_fn = frn.value_grad_and_relative_args(loss_fn)
        for x in batches:
          _, grads, relative_args = grad_fn(model, x)
          optimizer.update(model, grads, relative_args=relative_args)
      else:
        optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
        for x in batches:
          optimizer.update(model, frn.value_and_relative_grad(loss_fn)(model, x)[1])
      trained.append(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    assert max_difference(*trained) < 1e-12


class BatchNormThenFlow(nn.Module):
  """An ordinary layer with running statistics in front of a flow (a learned whitening)."""

  @nn.compact
  def log_prob(self, x, train: bool = True):
    h = nn.BatchNorm(
      use_running_average=not train, use_bias=False, use_scale=False, param_dtype=x.dtype
    )(x)
    return fr.FlowMLP(2, fr.SmoothLeakyReLU(0.3), param_dtype=x.dtype).log_prob(h)


def test_batch_norm_statistics_and_gradients_as_value_and_grad_with_mutable(float64):
  """A Linen model with BatchNorm: value_and_relative_grad(mutable=["batch_stats"]) returns
  the batch_stats that `apply(..., mutable=...)` returns, the same loss, and relative grads
  for the flow (checked elsewhere); a missing collection gets a clear error."""
  model = BatchNormThenFlow()
  x = 3.0 + jax.random.normal(jax.random.PRNGKey(0), (16, 3), jnp.float64)
  variables = model.init(jax.random.PRNGKey(1), x, method=BatchNormThenFlow.log_prob)
  params, model_state = variables["params"], {"batch_stats": variables["batch_stats"]}
  loss_fn = lambda m, x: -m.log_prob(x).mean()
  grad_fn = fr.value_and_relative_grad(model, loss_fn, mutable=["batch_stats"], exact_loss=True)
  (loss, new_state), grads = grad_fn(params, x, model_state=model_state)
  expected_loss, expected_state = model.apply(
    {"params": params, **model_state}, x, method=loss_fn, mutable=["batch_stats"]
  )
  assert abs(loss - expected_loss) < 1e-12
  assert max_difference(new_state, expected_state) == 0.0
  assert (
    max_difference(new_state, model_state) > 0.02
  )  # the running mean moved towards 3 (momentum 0.99)
  exact = jax.grad(
    lambda p: model.apply({"params": p, **model_state}, x, method=loss_fn, mutable=["batch_stats"])[
      0
    ]
  )(params)
  flow, exact_flow = grads["FlowMLP_0"], exact["FlowMLP_0"]
  for name in ("layers_0", "layers_1"):
    layer = params["FlowMLP_0"][name]
    kernel, bias = brute_force_relative_gradient(
      layer["kernel"], layer["bias"], exact_flow[name]["kernel"], exact_flow[name]["bias"]
    )
    assert jnp.abs(flow[name]["kernel"] - kernel).max() < 1e-12 * jnp.abs(kernel).max()
    assert jnp.abs(flow[name]["bias"] - bias).max() < 1e-12 * jnp.abs(bias).max()
  with pytest.raises(ValueError, match=r"model_state=\{'batch_stats'"):
    fr.value_and_relative_grad(model, loss_fn)(params, x)
  with pytest.raises(ValueError, match="model_state holds no such collection"):
    fr.value_and_relative_grad(model, loss_fn, mutable=["batch_stats"])(params, x)
