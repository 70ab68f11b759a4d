"""fr.fit on in-memory arrays: raises held-out likelihood, stops early, keeps the best epoch."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import flax_relgrad as fr
from conftest import HAS_NNX
from conftest import enable_x64


def skewed_data(n, seed):
  keys = jax.random.split(jax.random.PRNGKey(seed), 2)
  mixing = jnp.array([[1.0, 0.5, 0.0], [0.0, 0.3, 0.2], [0.4, 0.0, 2.0]])
  return (jax.random.gamma(keys[0], 2.0, (n, 3)) - 2.0) @ mixing


def test_fit_raises_held_out_likelihood_and_stops_early(capsys):
  model = fr.FlowMLP(2, fr.SmoothLeakyReLU(0.3))
  train, validation, test = skewed_data(2000, 0), skewed_data(500, 1), skewed_data(1000, 2)
  params = model.init(jax.random.PRNGKey(0), train[:1])["params"]
  held_out = lambda p: float(model.apply({"params": p}, test, method="log_prob").mean())
  result = fr.fit(
    model,
    params,
    train,
    validation,
    optimizer=optax.adam(3e-2),
    batch_size=100,
    max_epochs=200,
    patience=3,
    progress=False,
  )
  epochs = len(result.history["validation_nll"])
  assert epochs < 200 and result.best_epoch == epochs - 3  # early stopping after `patience`
  assert result.history["validation_nll"][result.best_epoch - 1] == min(
    result.history["validation_nll"]
  )
  assert held_out(result.params) > held_out(params) + 0.5
  # train_nll is the exact NLL's scale: near the validation NLL, not the log-det-free loss.
  assert abs(result.history["train_nll"][-1] - result.history["validation_nll"][-1]) < 0.5
  assert capsys.readouterr().out == ""


def test_fit_conditional_and_progress_output(capsys):
  model = fr.ConditionalFlowMLP(2)
  c = jax.random.uniform(jax.random.PRNGKey(0), (600, 1))
  x = 3.0 * c + jax.random.normal(jax.random.PRNGKey(1), (600, 2))
  params = model.init(jax.random.PRNGKey(2), x[:1], c[:1])["params"]
  result = fr.fit(
    model, params, (x[:500], c[:500]), (x[500:], c[500:]), max_epochs=2, batch_size=50
  )
  assert len(result.history["train_nll"]) == 2
  assert all(np.isfinite(result.history["validation_nll"]))


def test_fit_refuses_bad_arrays_and_reports_divergence():
  model = fr.FlowMLP(2)
  params = model.init(jax.random.PRNGKey(0), jnp.ones((1, 3)))["params"]
  with pytest.raises(ValueError, match="differ in their feature shapes"):
    fr.fit(model, params, jnp.ones((10, 3)), jnp.ones((10, 4)), progress=False)
  with pytest.raises(ValueError, match="batch_size must lie in"):
    fr.fit(model, params, jnp.ones((10, 3)), jnp.ones((10, 3)), batch_size=20, progress=False)
  with pytest.raises(ValueError, match="N >= 1 rows"):
    fr.fit(model, params, jnp.ones((0, 3)), jnp.ones((10, 3)), progress=False)
  for setting in (
    {"max_epochs": 0},
    {"patience": 0},
    {"patience": -1},
    {"max_epochs": 2.5},
    {"batch_size": 5.0},
    {"batch_size": True},
  ):
    with pytest.raises(ValueError, match=f"{next(iter(setting))} must be an integer >= 1"):
      fr.fit(model, params, jnp.ones((10, 3)), jnp.ones((10, 3)), progress=False, **setting)
  with pytest.raises(FloatingPointError, match="fit diverged in epoch 1"):
    fr.fit(
      model,
      params,
      skewed_data(200, 0) * 1e3,
      skewed_data(50, 1),
      optimizer=optax.sgd(1e3),
      batch_size=50,
      progress=False,
    )


def test_fit_takes_numpy_and_array_likes_and_names_non_finite_rows():
  """NumPy arrays (what most users hold) train exactly like the same values as JAX arrays; a
  NaN or inf is refused before training with its row."""
  model = fr.FlowMLP(1)
  train, validation = np.asarray(skewed_data(300, 0)), np.asarray(skewed_data(100, 1))
  params = model.init(jax.random.PRNGKey(0), train[:1])["params"]
  run = lambda t, v: (
    fr.fit(model, params, t, v, max_epochs=2, batch_size=50, progress=False).history
  )
  assert run(train, validation) == run(jnp.asarray(train), jnp.asarray(validation))
  assert len(run(train.tolist(), validation.tolist())["train_nll"]) == 2  # nested lists
  assert run(list(train), list(validation)) == run(train, validation)  # lists of 1-D rows
  # Settings as NumPy integers (what arithmetic on array sizes gives) work as Python ints.
  assert fr.fit(
    model,
    params,
    train,
    validation,
    max_epochs=np.int64(2),
    batch_size=np.int32(50),
    patience=np.int64(2),
    progress=False,
  ).history == run(train, validation)
  # float64 beyond float32's range is inf to JAX without x64: refused as non-finite, not
  # reported later as a diverged run.
  overflowing = train.astype(np.float64)
  overflowing[5, 1] = 1e39
  with pytest.raises(ValueError, match=r"beyond the range of float32.*first in row 5"):
    run(overflowing, validation)
  broken = train.copy()
  broken[17, 2] = np.nan
  with pytest.raises(
    ValueError, match=r"train holds non-finite values \(NaN or inf, .*first in row 17"
  ):
    run(broken, validation)
  context = np.ones((100, 1))
  context[3] = np.inf
  conditional = fr.ConditionalFlowMLP(1)
  conditional_params = conditional.init(jax.random.PRNGKey(0), train[:1], context[:1])["params"]
  with pytest.raises(ValueError, match=r"validation\[1\] holds non-finite values .* row 3"):
    fr.fit(
      conditional,
      conditional_params,
      (train, np.ones((300, 1))),
      (validation, context),
      progress=False,
    )
  # A tuple is (x, context) even when its parts are nested lists.
  as_lists = lambda *arrays: tuple(a.tolist() for a in arrays)
  history = fr.fit(
    conditional,
    conditional_params,
    as_lists(train, np.ones((300, 1))),
    as_lists(validation, np.ones((100, 1))),
    max_epochs=1,
    batch_size=50,
    progress=False,
  ).history
  assert np.isfinite(history["validation_nll"][0])


@pytest.mark.skipif(not HAS_NNX, reason="flax_relgrad.nnx needs flax >= 0.12")
def test_fit_refuses_an_nnx_model_and_names_the_nnx_loop():
  import flax.nnx as nnx  # pylint: disable=g-import-not-at-top

  import flax_relgrad.nnx as frn  # pylint: disable=g-import-not-at-top

  model = frn.FlowMLP(3, 2, rngs=nnx.Rngs(0))
  with pytest.raises(
    TypeError, match="fit trains Linen modules.*flax_relgrad.nnx.value_and_relative_grad"
  ):
    fr.fit(model, nnx.state(model, nnx.Param), np.ones((10, 3)), np.ones((5, 3)), progress=False)


def test_fit_bfloat16_params_and_float64_data_keep_the_param_dtypes():
  """The relative gradient of a bfloat16 flow comes back in bfloat16 (and that of a float32
  flow fed float64 NumPy data under x64 in float32), so `fit`'s scanned steps keep their
  carry types; before, the scan refused the changed optimizer-state dtype."""
  data = np.random.default_rng(0).normal(size=(120, 4))
  model = fr.FlowMLP(num_layers=2, param_dtype=jnp.bfloat16)
  params = model.init(jax.random.PRNGKey(1), jnp.zeros((1, 4)))["params"]
  result = fr.fit(
    model, params, data[:100], data[100:], batch_size=20, max_epochs=1, progress=False
  )
  assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(result.params)} == {
    jnp.dtype(jnp.bfloat16)
  }
  # bfloat16 data trains too (its dtype is a number to JAX, not to NumPy).
  bfloat16_data = jnp.asarray(data, jnp.bfloat16)
  history = fr.fit(
    model,
    params,
    bfloat16_data[:100],
    bfloat16_data[100:],
    batch_size=20,
    max_epochs=1,
    progress=False,
  ).history
  assert np.isfinite(history["validation_nll"][0])
  with enable_x64(True):
    model = fr.FlowMLP(num_layers=2)
    params = model.init(jax.random.PRNGKey(1), jnp.zeros((1, 4), jnp.float32))["params"]
    result = fr.fit(
      model, params, data[:100], data[100:], batch_size=20, max_epochs=1, progress=False
    )
  assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(result.params)} == {
    jnp.dtype(jnp.float32)
  }
  assert np.isfinite(result.history["validation_nll"][0])


class _WithBatchNorm(nn.Module):
  @nn.compact
  def log_prob(self, x):
    return fr.FlowMLP(2)(nn.BatchNorm(use_running_average=False)(x))


class _WithDropout(nn.Module):
  @nn.compact
  def log_prob(self, x):
    return fr.FlowMLP(2).log_prob(nn.Dropout(0.1, deterministic=False)(x))


def test_fit_says_what_it_supports_for_state_rngs_and_relative_jacobian():
  """A model with batch statistics or dropout, or an optimizer that holds relative_jacobian(),
  got errors that named arguments fit does not have (model_state, rngs, relative_args) or a
  raw InvalidRngError; now each says what fit trains and where to go instead."""
  x = jax.random.normal(jax.random.PRNGKey(0), (64, 3))
  flow = fr.FlowMLP(2)
  flow_params = flow.init(jax.random.PRNGKey(1), x[:2])["params"]
  relative_chain = optax.chain(fr.relative_jacobian(), optax.adam(1e-3))
  batch_norm = _WithBatchNorm()
  dropout = _WithDropout()
  init = lambda model, **rngs: model.init(
    {"params": jax.random.PRNGKey(1), **rngs}, x[:2], method="log_prob"
  )["params"]
  for model, params, optimizer in (
    (flow, flow_params, relative_chain),
    (batch_norm, init(batch_norm), None),
    (dropout, init(dropout, dropout=jax.random.PRNGKey(2)), None),
  ):
    with pytest.raises(ValueError, match="fit trains a flow whose variables are its params only"):
      fr.fit(model, params, x[:48], x[48:], optimizer=optimizer, batch_size=16, progress=False)
