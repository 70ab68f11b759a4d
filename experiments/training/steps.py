"""The model, optimiser, train state and jitted steps of a run: the one place that uses `flax_relgrad`.

A train step is one exact maximum-likelihood update with the relative gradient (see
docs/method.md, "Exact relative gradient"): `fr.relative_update`, the step `fr.fit` runs too,
with the optax chain `(clip) → Adam` acting on the relative gradient. The chain also holds the
learning rate: the schedule and a `learning_rate_scale` that divergence handling lowers are
injected hyperparameters of it (`optax.inject_hyperparams`), so the optimiser state is the
single truth about the learning rate.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

import flax_relgrad as fr
from experiments.training import data
from experiments.training import parallel

PyTree = Any


@flax.struct.dataclass
class TrainState:
  """Everything a resumed run needs, as one checkpointable pytree."""

  step: jax.Array
  params: PyTree
  opt_state: optax.InjectStatefulHyperparamsState  # Holds the learning rate and its scale.
  loss_sum: jax.Array  # Σ of the per-step losses since the last log (reset at each log).
  first_nonfinite_step: jax.Array  # −1 until a step's loss is not finite.
  best_validation_ll: jax.Array
  evals_since_best: jax.Array
  # Divergence reference: the lowest logged window-mean training NLL, and before the first
  # window the initial parameters' validation NLL (set when training starts).
  lowest_train_nll: jax.Array
  divergences: jax.Array  # Divergences recovered from so far.
  # The exponential moving average of params that evaluation uses (config.ema_decay > 0; see
  # `make_train_step`), or None: evaluation uses params, and the checkpoint has no such entry.
  ema_params: PyTree = None


def evaluation_params(state: TrainState) -> PyTree:
  """The parameters a run evaluates, checkpoints as best and samples from."""
  return state.params if state.ema_params is None else state.ema_params


def create_model(config: ml_collections.ConfigDict) -> fr.FlowMLP:
  kernel_inits = {
    "orthogonal": jax.nn.initializers.orthogonal(),
    "near_identity": fr.near_identity(),
  }
  if config.kernel_init not in kernel_inits:
    raise ValueError(
      f"config.kernel_init={config.kernel_init!r} is not one of {sorted(kernel_inits)}."
    )
  return fr.FlowMLP(
    num_layers=config.num_layers,
    activation=fr.SmoothLeakyReLU(config.alpha),
    use_bias=config.use_bias,
    kernel_init=kernel_inits[config.kernel_init],
    # .get: a workdir's config.json from before splines existed has neither field.
    spline_bins=config.get("spline_bins", 0),
    spline_bound=config.get("spline_bound", 4.0),
    spline_placement=config.get("spline_placement", "every_layer"),
  )


def learning_rate_schedule(config: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warm-up over `warmup_steps`, then constant or cosine decay to `final_lr_fraction`·lr."""
  peak, warmup = config.learning_rate, config.warmup_steps
  if config.lr_schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(
      init_value=0.0 if warmup else peak,
      peak_value=peak,
      warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1),
      end_value=peak * config.final_lr_fraction,
    )
  if config.lr_schedule == "constant":
    if not warmup:
      return optax.constant_schedule(peak)
    return optax.join_schedules(
      [optax.linear_schedule(0.0, peak, warmup), optax.constant_schedule(peak)], [warmup]
    )
  raise ValueError(
    f"config.lr_schedule={config.lr_schedule!r} is not one of ['constant', 'cosine']."
  )


def create_optimizer(
  config: ml_collections.ConfigDict, total_steps: int
) -> optax.GradientTransformationExtraArgs:
  """(optional) clip_by_global_norm(clip_norm) → Adam(learning_rate), on the relative gradient.

  learning_rate = schedule(step) · learning_rate_scale, both hyperparameters injected into the
  optimiser state (`learning_rate` and `learning_rate_scale` below).
  """
  clip = [optax.clip_by_global_norm(config.clip_norm)] if config.clip_norm > 0 else []

  def chain(
    learning_rate: jax.Array, learning_rate_scale: jax.Array
  ) -> optax.GradientTransformation:
    return optax.chain(*clip, optax.adam(learning_rate * learning_rate_scale))

  return optax.inject_hyperparams(chain)(
    learning_rate=learning_rate_schedule(config, total_steps), learning_rate_scale=1.0
  )


def learning_rate(state: TrainState) -> float:
  """The learning rate of the last step taken (the schedule's value times the scale)."""
  hyperparams = state.opt_state.hyperparams
  return float(hyperparams["learning_rate"]) * float(hyperparams["learning_rate_scale"])


def learning_rate_scale(state: TrainState) -> float:
  return float(state.opt_state.hyperparams["learning_rate_scale"])


def with_learning_rate_scale(state: TrainState, scale: float) -> TrainState:
  """The state with the optimiser's `learning_rate_scale` set to `scale`."""
  hyperparams = dict(state.opt_state.hyperparams)
  old = hyperparams["learning_rate_scale"]
  hyperparams["learning_rate_scale"] = jnp.full_like(old, scale, device=old.sharding)
  return state.replace(opt_state=state.opt_state._replace(hyperparams=hyperparams))


def initial_state(
  model: fr.FlowMLP,
  tx: optax.GradientTransformation,
  num_features: int,
  seed: int,
  ema: bool = False,
) -> TrainState:
  """Step 0; with `ema`, the average starts at the initial params."""
  params = model.init(jax.random.PRNGKey(seed), jnp.zeros((1, num_features)))["params"]
  return TrainState(
    step=jnp.array(0, jnp.int32),
    params=params,
    opt_state=tx.init(params),
    loss_sum=jnp.array(0.0, jnp.float32),
    first_nonfinite_step=jnp.array(-1, jnp.int32),
    best_validation_ll=jnp.array(-jnp.inf, jnp.float32),
    evals_since_best=jnp.array(0, jnp.int32),
    lowest_train_nll=jnp.array(jnp.inf, jnp.float32),
    divergences=jnp.array(0, jnp.int32),
    ema_params=params if ema else None,
  )


def abstract_state(
  model: fr.FlowMLP,
  tx: optax.GradientTransformation,
  num_features: int,
  seed: int,
  data_parallel: parallel.DataParallel,
  ema: bool = False,
) -> TrainState:
  """Shapes, dtypes and (replicated) shardings of the train state: the target for restoring."""
  return data_parallel.abstract_replicated(
    jax.eval_shape(lambda: initial_state(model, tx, num_features, seed, ema))
  )


def make_train_step(model: fr.FlowMLP, tx: optax.GradientTransformation, ema_decay: float = 0.0):
  """One relative-gradient step (state, y (B, D)) → state, recording a non-finite loss.

  If the state keeps `ema_params`, step t (counting from 0) also updates them to
  β_t·ema + (1 − β_t)·params_{t+1} with β_t = min(ema_decay, (1 + t) / (10 + t)): the
  warm-up keeps the initial params from weighing on a short run (β^t of them would remain).
  """

  def average(state: TrainState, params: PyTree) -> PyTree:
    if state.ema_params is None:
      return None
    t = state.step.astype(jnp.float32)
    beta = jnp.minimum(ema_decay, (1.0 + t) / (10.0 + t))
    return jax.tree.map(lambda e, p: beta * e + (1.0 - beta) * p, state.ema_params, params)

  def train_step(state: TrainState, batch: jax.Array) -> TrainState:
    params, opt_state, loss = fr.relative_update(model, tx, state.params, state.opt_state, batch)
    first_bad = jnp.where(
      (state.first_nonfinite_step < 0) & ~jnp.isfinite(loss),
      state.step + 1,
      state.first_nonfinite_step,
    )
    return state.replace(
      step=state.step + 1,
      params=params,
      opt_state=opt_state,
      loss_sum=state.loss_sum + loss,
      first_nonfinite_step=first_bad,
      ema_params=average(state, params),
    )

  return train_step


def make_train_chunk(
  model: fr.FlowMLP,
  tx: optax.GradientTransformation,
  source: data.DataSource,
  seed: int,
  data_parallel: parallel.DataParallel,
  ema_decay: float = 0.0,
):
  """A jitted (state, chunk, epoch) → state running k train steps in one call (`lax.scan`).

  `chunk` holds raw records (k, B, D), sharded along B over the `data` mesh, and their batch
  indices (k,); each batch is preprocessed on the devices (`source.preprocess`) with
  randomness keyed by (seed, epoch, batch index). The state is replicated and its old
  buffers are donated. `ema_decay`: see `make_train_step`.
  """
  train_step = make_train_step(model, tx, ema_decay)

  def train_chunk(state: TrainState, chunk: dict[str, jax.Array], epoch: jax.Array) -> TrainState:
    def body(state, examples_and_index):
      examples, batch_index = examples_and_index
      key = data.noise_key(seed, data.TRAIN_NOISE, epoch, batch_index)
      return train_step(state, source.preprocess(examples, key, training=True)), None

    return jax.lax.scan(body, state, (chunk["examples"], chunk["batch_index"]))[0]

  replicated = data_parallel.replicated
  return jax.jit(
    train_chunk,
    donate_argnums=0,
    out_shardings=replicated,
    in_shardings=(replicated, data_parallel.chunk_sharding, replicated),
  )


LIKELIHOOD_PARTS = ("activation_log_det", "gaussian")


def make_eval_step(
  model: fr.FlowMLP, source: data.DataSource, data_parallel: parallel.DataParallel
):
  """A jitted (params, y (N, D)) → per-example arrays (N,) of the log-likelihood and its parts.

  y may be sharded along N (see `DataParallel.put_batch`); the outputs are replicated, so
  every host can read them.

  Keys: `ll` (log p(y), nats of the model's input space), `activation_log_det`
  (Σ log σ'(y_k)) and `gaussian` (log N(z)), with ll = gaussian + activation_log_det +
  Σ log|det W| (docs/method.md, "Exact log-likelihood"); and the source's extra metrics
  (images: `bpd`, bits/dim of the pixels).
  """

  def eval_step(params: PyTree, y: jax.Array) -> dict[str, jax.Array]:
    variables = {"params": params}
    z, activation_log_det = model.apply(
      variables, y, method=fr.FlowMLP.forward_and_activation_log_det
    )
    gaussian = fr.standard_normal_log_prob(z)
    log_prob = (
      gaussian + activation_log_det + model.apply(variables, method=fr.FlowMLP.kernel_log_abs_det)
    )
    return {
      "ll": log_prob,
      "activation_log_det": activation_log_det,
      "gaussian": gaussian,
      **source.extra_metrics(log_prob, y),
    }

  return jax.jit(eval_step, out_shardings=data_parallel.replicated)


def make_kernel_log_abs_det(model: fr.FlowMLP) -> Callable[[PyTree], jax.Array]:
  """A jitted params → Σ_k log|det W_k| (O(D³): for logging, not every step)."""
  return jax.jit(
    lambda params: model.apply({"params": params}, method=fr.FlowMLP.kernel_log_abs_det)
  )
