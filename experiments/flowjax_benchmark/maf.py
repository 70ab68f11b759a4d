"""flowjax's best MNIST flow, trained on the MNIST programs' data protocol against a clock.

The flow is flowjax's `masked_autoregressive_flow` with a rational-quadratic spline
transformer (`MafSettings`; by default 4 layers, masked MLPs of width 256, 8 knots on
[−14, 14]: 23.4 M parameters), trained by Adam with a constant learning rate on the negative
log-likelihood of y = logit(λ + (1−2λ)(p + u)/256), exactly the batches, the dequantisation
noise and the test arrays of `python -m experiments.mnist` with the same seed
(`experiments.training.data`). Its test metrics are computed as the MNIST programs' are: the
source's bits/dim per example, mean ± 2 standard errors over the test split
(`experiments.training.evaluation.evaluate`).
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import math
import time
from typing import Any

import equinox as eqx
from flowjax.bijections import RationalQuadraticSpline
from flowjax.distributions import Normal
from flowjax.flows import masked_autoregressive_flow
import jax
import jax.numpy as jnp
import ml_collections
import optax
import paramax

from experiments import images
from experiments.training import data
from experiments.training import evaluation

PyTree = Any


@dataclasses.dataclass(frozen=True)
class MafSettings:
  """The flowjax flow and its training.

  Attributes:
    flow_layers: masked autoregressive layers.
    width: width of each layer's masked MLP (one hidden layer).
    knots: knots of each coordinate's rational-quadratic spline.
    interval: the splines act on [−interval, interval], the identity outside.
    learning_rate: Adam's (constant) learning rate.
  """

  flow_layers: int = 4
  width: int = 256
  knots: int = 8
  interval: float = 14.0
  learning_rate: float = 5e-4


@dataclasses.dataclass(frozen=True)
class Checkpoint:
  """The flow's test metrics at the first chance after `mark_minutes` of its clock (building,
  compiling, training; the tests are off the clock): after `minutes` of it."""

  mark_minutes: float
  minutes: float
  steps: int
  epochs: float
  bpd: float
  bpd_2se: float
  ll: float
  ll_2se: float


def make_flow(settings: MafSettings, num_features: int, seed: int) -> eqx.Module:
  return masked_autoregressive_flow(
    jax.random.key(seed),
    base_dist=Normal(jnp.zeros(num_features)),
    transformer=RationalQuadraticSpline(knots=settings.knots, interval=settings.interval),
    flow_layers=settings.flow_layers,
    nn_width=settings.width,
  )


def count_parameters(tree: PyTree) -> int:
  """Entries of the floating-point arrays of a flowjax module or of Flax params."""
  return sum(leaf.size for leaf in jax.tree.leaves(eqx.filter(tree, eqx.is_inexact_array)))


def _split(flow: eqx.Module) -> tuple[PyTree, PyTree]:
  """(trainable params, the rest), as flowjax's own training loops split a flow."""
  return eqx.partition(
    flow, eqx.is_inexact_array, is_leaf=lambda leaf: isinstance(leaf, paramax.NonTrainable)
  )


def train_against_clock(
  settings: MafSettings,
  source: images.ImageSource,
  config: ml_collections.ConfigDict,
  test_y: jax.Array,
  marks_minutes: list[float],
  log: Callable[[str], None] = print,
) -> tuple[list[Checkpoint], eqx.Module]:
  """Trains until the last mark; tests the flow at each mark of its clock.

  `config` gives the protocol shared with `experiments.mnist`: `seed`, `batch_size`,
  `steps_per_call` (train steps per jitted call, a `lax.scan`; the clock is read between
  calls, so a mark is passed by at most one call) and `lam`. Returns the checkpoints, one per
  mark in increasing order, and the trained flow.
  """
  splits = source.splits
  if splits.num_train < config.batch_size:
    raise ValueError(
      f"The training split has {splits.num_train} examples, fewer than one batch of "
      f"{config.batch_size}; lower --maf_batch_size."
    )
  marks = sorted(marks_minutes)
  clock_s = 0.0
  started = time.perf_counter()
  flow = make_flow(settings, splits.num_features, config.seed)
  params, static = _split(flow)
  optimizer = optax.adam(settings.learning_rate)
  opt_state = optimizer.init(params)

  def loss(params: PyTree, y: jax.Array) -> jax.Array:
    return -paramax.unwrap(eqx.combine(params, static)).log_prob(y).mean()

  @jax.jit
  def train_chunk(params, opt_state, examples, batch_index, epoch):
    def body(carry, example_and_index):
      params, opt_state = carry
      raw, index = example_and_index
      y = source.preprocess(
        raw, data.noise_key(config.seed, data.TRAIN_NOISE, epoch, index), training=True
      )
      value, grads = jax.value_and_grad(loss)(params, y)
      updates, opt_state = optimizer.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), value

    (params, opt_state), values = jax.lax.scan(body, (params, opt_state), (examples, batch_index))
    return params, opt_state, values.mean()

  @jax.jit
  def eval_step(params: PyTree, y: jax.Array) -> dict[str, jax.Array]:
    """Per-example log p(y) and the source's bits/dim, as the MNIST programs' eval step."""
    log_prob = paramax.unwrap(eqx.combine(params, static)).log_prob(y)
    return {"ll": log_prob, **source.extra_metrics(log_prob, y)}

  steps_per_epoch = splits.num_train // config.batch_size
  checkpoints: list[Checkpoint] = []
  step, epoch = 0, 0
  while marks:
    for chunk in data.train_chunks(splits, config, epoch):
      params, opt_state, train_nll = train_chunk(
        params, opt_state, chunk["examples"], chunk["batch_index"], epoch
      )
      jax.block_until_ready(params)
      step += chunk["batch_index"].shape[0]
      if not math.isfinite(float(train_nll)):
        raise FloatingPointError(f"flowjax's training loss is {float(train_nll)} at step {step}.")
      elapsed_s = clock_s + time.perf_counter() - started
      if elapsed_s < 60 * marks[0]:
        continue
      clock_s, minutes = elapsed_s, elapsed_s / 60  # The clock stops for the test.
      checkpoints.append(
        _test(params, eval_step, test_y, config, marks[0], minutes, step, steps_per_epoch)
      )
      log(f"flowjax at {minutes:.2f} min, step {step}: test {checkpoints[-1].bpd:.4f} bits/dim")
      marks.pop(0)
      if not marks:
        break
      started = time.perf_counter()
    epoch += 1
  return checkpoints, paramax.unwrap(eqx.combine(params, static))


def _test(
  params: PyTree,
  eval_step: evaluation.EvalStep,
  test_y: jax.Array,
  config: ml_collections.ConfigDict,
  mark_minutes: float,
  minutes: float,
  step: int,
  steps_per_epoch: int,
) -> Checkpoint:
  metrics = evaluation.evaluate(eval_step, params, test_y, config.eval_batch_size)
  if not math.isfinite(metrics["ll"]):
    raise FloatingPointError(f"flowjax's test log-likelihood is not finite at step {step}.")
  return Checkpoint(
    mark_minutes,
    minutes,
    step,
    step / steps_per_epoch,
    metrics["bpd"],
    metrics["bpd_2se"],
    metrics["ll"],
    metrics["ll_2se"],
  )
