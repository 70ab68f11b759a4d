"""Maximum-likelihood training of a dense flow with relative gradients, for any `DataSource`.

`train_and_evaluate(config, workdir)` runs the CLU loop: jitted relative-gradient steps,
TensorBoard metrics, the source's picture (sample grid, 2-D density), Orbax checkpoints
(latest state for resuming, best parameters by validation likelihood), early stopping,
divergence handling, and a final test evaluation. Every dataset goes through this one loop;
`config.data_source` picks the data (see `data.load_source`).
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

from absl import logging
from clu import metric_writers
from clu import periodic_actions
import flax
import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import ml_collections
import numpy as np
import optax

import flax_relgrad as fr
from experiments.training import checkpoints
from experiments.training import data
from experiments.training import parallel

PyTree = Any


@flax.struct.dataclass
class TrainState:
  """Everything a resumed run needs, as one checkpointable pytree."""

  step: jax.Array
  params: PyTree
  opt_state: PyTree
  loss_sum: jax.Array  # Σ of the per-step losses since the last log (reset at each log).
  first_nonfinite_step: jax.Array  # −1 until a step's loss is not finite.
  best_validation_ll: jax.Array
  evals_since_best: jax.Array
  lowest_train_nll: jax.Array  # Lowest logged window-mean training NLL (divergence reference).
  learning_rate_scale: jax.Array  # Multiplies every update; reduced after each divergence.
  divergences: jax.Array  # Divergences recovered from so far.


def create_model(config: ml_collections.ConfigDict) -> fr.FlowMLP:
  kernel_inits = {"orthogonal": jax.nn.initializers.orthogonal(), "near_identity": fr.near_identity()}
  if config.kernel_init not in kernel_inits:
    raise ValueError(
        f"config.kernel_init={config.kernel_init!r} is not one of {sorted(kernel_inits)}."
    )
  return fr.FlowMLP(
      num_layers=config.num_layers,
      activation=fr.SmoothLeakyReLU(config.alpha),
      use_bias=config.use_bias,
      kernel_init=kernel_inits[config.kernel_init],
  )


def learning_rate_schedule(config: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warm-up over `warmup_steps`, then constant or cosine decay to `final_lr_fraction`·lr."""
  peak, warmup = config.learning_rate, config.warmup_steps
  if config.lr_schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0 if warmup else peak, peak_value=peak, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=peak * config.final_lr_fraction,
    )
  if config.lr_schedule == "constant":
    if not warmup:
      return optax.constant_schedule(peak)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, peak, warmup), optax.constant_schedule(peak)], [warmup]
    )
  raise ValueError(f"config.lr_schedule={config.lr_schedule!r} is not one of ['constant', 'cosine'].")


def create_optimizer(config: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
  """relative_jacobian → (optional) clip_by_global_norm(clip_norm) → Adam(schedule)."""
  clip = [optax.clip_by_global_norm(config.clip_norm)] if config.clip_norm > 0 else []
  return optax.chain(
      fr.relative_jacobian(), *clip, optax.adam(learning_rate_schedule(config, total_steps))
  )


def initial_state(model: fr.FlowMLP, tx: optax.GradientTransformation, num_features: int, seed: int) -> TrainState:
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
      learning_rate_scale=jnp.array(1.0, jnp.float32),
      divergences=jnp.array(0, jnp.int32),
  )


def abstract_state(model: fr.FlowMLP, tx: optax.GradientTransformation, num_features: int, seed: int,
                   data_parallel: parallel.DataParallel) -> TrainState:
  """Shapes, dtypes and (replicated) shardings of the train state: the target for restoring."""
  return data_parallel.abstract_replicated(
      jax.eval_shape(lambda: initial_state(model, tx, num_features, seed)))


def make_train_step(model: fr.FlowMLP, tx: optax.GradientTransformation):
  """One relative-gradient step (state, y (B, D)) → state, recording a non-finite loss."""

  def train_step(state: TrainState, batch: jax.Array) -> TrainState:
    loss, grads, extra = fr.value_and_relative_grad_args(model, state.params, batch)
    updates, opt_state = tx.update(grads, state.opt_state, state.params, **extra)
    first_bad = jnp.where(
        (state.first_nonfinite_step < 0) & ~jnp.isfinite(loss), state.step + 1, state.first_nonfinite_step
    )
    updates = jax.tree_util.tree_map(lambda update: state.learning_rate_scale * update, updates)
    return state.replace(
        step=state.step + 1,
        params=optax.apply_updates(state.params, updates),
        opt_state=opt_state,
        loss_sum=state.loss_sum + loss,
        first_nonfinite_step=first_bad,
    )

  return train_step


def make_train_chunk(model: fr.FlowMLP, tx: optax.GradientTransformation, source: data.DataSource,
                     seed: int, data_parallel: parallel.DataParallel):
  """A jitted (state, chunk, epoch) → state running k train steps in one call (`lax.scan`).

  `chunk` holds raw records (k, B, D), sharded along B over the `data` mesh, and their batch
  indices (k,); each batch is preprocessed on the devices (`source.preprocess`) with
  randomness keyed by (seed, epoch, batch index). The state is replicated and its old
  buffers are donated.
  """
  train_step = make_train_step(model, tx)

  def train_chunk(state: TrainState, chunk: dict[str, jax.Array], epoch: jax.Array) -> TrainState:
    def body(state, examples_and_index):
      examples, batch_index = examples_and_index
      key = data.noise_key(seed, data.TRAIN_NOISE, epoch, batch_index)
      return train_step(state, source.preprocess(examples, key, training=True)), None

    return jax.lax.scan(body, state, (chunk["examples"], chunk["batch_index"]))[0]

  replicated = data_parallel.replicated
  return jax.jit(
      train_chunk, donate_argnums=0, out_shardings=replicated,
      in_shardings=(replicated, data_parallel.chunk_sharding, replicated),
  )


LIKELIHOOD_PARTS = ("activation_log_det", "gaussian")


def make_eval_step(model: fr.FlowMLP, source: data.DataSource, data_parallel: parallel.DataParallel):
  """A jitted (params, y (N, D)) → per-example arrays (N,) of the log-likelihood and its parts.

  y may be sharded along N (see `DataParallel.put_batch`); the outputs are replicated, so
  every host can read them.

  Keys: `ll` (log p(y), nats of the model's input space), `activation_log_det`
  (Σ log σ'(y_k)) and `gaussian` (log N(z)), with ll = gaussian + activation_log_det +
  Σ log|det W|; and the source's extra metrics (images: `bpd`, bits/dim of the pixels).
  """

  def eval_step(params: PyTree, y: jax.Array) -> dict[str, jax.Array]:
    variables = {"params": params}
    z, activation_log_det = model.apply(variables, y, method=fr.FlowMLP.forward_and_activation_log_det)
    gaussian = fr.standard_normal_log_prob(z)
    log_prob = gaussian + activation_log_det + model.apply(variables, method=fr.FlowMLP.kernel_log_abs_det)
    return {"ll": log_prob, "activation_log_det": activation_log_det, "gaussian": gaussian,
            **source.extra_metrics(log_prob, y)}

  return jax.jit(eval_step, out_shardings=data_parallel.replicated)


def evaluate(eval_step, params: PyTree, y: np.ndarray, batch_size: int, put=jax.device_put) -> dict[str, float]:
  """Means over y (N, D) of `eval_step`'s outputs, and 2 standard errors (`<key>_2se`) of all
  but the likelihood parts.

  Each batch of y (host memory) is placed on the devices by `put`.
  """
  batches = [eval_step(params, put(y[start:start + batch_size])) for start in range(0, y.shape[0], batch_size)]
  values = {key: np.concatenate([np.asarray(batch[key]) for batch in batches]) for key in batches[0]}
  two_se = lambda v: float(2 * v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else float("nan")
  metrics = {key: float(value.mean()) for key, value in values.items()}
  metrics.update({f"{key}_2se": two_se(value) for key, value in values.items() if key not in LIKELIHOOD_PARTS})
  return metrics


def kernel_diagnostics(params: PyTree) -> dict[str, float]:
  """Per-layer log|det W| and condition number, from the eigenvalues of WᵀW in float64.

  O(D³) each: for evaluations only. (Squaring the singular values is accurate enough in
  float64 for the condition numbers a trainable flow has.)
  """
  diagnostics = {}
  for name, layer in params.items():
    kernel = np.asarray(layer["kernel"], np.float64)
    singular_values = np.sqrt(np.linalg.eigvalsh(kernel.T @ kernel))
    diagnostics[f"kernels/{name}/log_abs_det"] = float(np.log(singular_values).sum())
    diagnostics[f"kernels/{name}/condition"] = float(singular_values[-1] / singular_values[0])
  return diagnostics


def save_png(path: str, picture: np.ndarray) -> None:
  """Writes a (H, W, C) picture in [0, 1] (grey, RGB or RGBA) as a PNG, atomically."""
  temporary = path + ".tmp.png"
  image = picture[..., 0] if picture.shape[-1] == 1 else picture
  plt.imsave(temporary, image, cmap="gray", vmin=0.0, vmax=1.0)
  os.replace(temporary, path)


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first out-of-range field."""
  for field in ("batch_size", "steps_per_call", "num_epochs", "log_every_steps", "eval_every_epochs",
                "eval_batch_size"):
    if int(config[field]) < 1:
      raise ValueError(f"config.{field} must be a positive integer, got {config[field]}.")
  if config.checkpoint_every_steps < 0:
    raise ValueError(f"config.checkpoint_every_steps must be >= 0, got {config.checkpoint_every_steps}.")
  if not config.learning_rate > 0:
    raise ValueError(f"config.learning_rate must be positive, got {config.learning_rate}.")
  if config.on_divergence not in ("stop", "restore"):
    raise ValueError(f"config.on_divergence={config.on_divergence!r} is not one of ['restore', 'stop'].")
  if not 0.0 < config.divergence_lr_factor < 1.0:
    raise ValueError(f"config.divergence_lr_factor must lie in (0, 1), got {config.divergence_lr_factor}.")
  for field in ("warmup_steps", "clip_norm", "divergence_nats", "max_divergences"):
    if config[field] < 0:
      raise ValueError(f"config.{field} must be >= 0, got {config[field]}.")


def describe(metrics: dict[str, float]) -> str:
  """"LL −3.34 ± 0.02 nats", or for images (which report bits/dim, and whose LL is of the
  logit-transformed pixels) "LL −1375.78 ± 1.39 logit nats, 2.0303 ± 0.0056 bits/dim"."""
  if "bpd" not in metrics:
    return f"LL {metrics['ll']:.2f} ± {metrics['ll_2se']:.2f} nats"
  return (f"LL {metrics['ll']:.2f} ± {metrics['ll_2se']:.2f} logit nats, "
          f"{metrics['bpd']:.4f} ± {metrics['bpd_2se']:.4f} bits/dim")


class _Run:
  """One training run: the model, its jitted functions, data, writer and checkpoints."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, source: data.DataSource):
    self.config, self.workdir, self.source = config, workdir, source
    splits = self.splits = source.splits
    self.steps_per_epoch = splits.num_train // config.batch_size
    if self.steps_per_epoch < 1:
      raise ValueError(f"The training split has {splits.num_train} examples, fewer than one batch.")
    self.total_steps = self.steps_per_epoch * config.num_epochs
    self.schedule = learning_rate_schedule(config, self.total_steps)
    self.model, self.tx = create_model(config), create_optimizer(config, self.total_steps)
    self.eval_every_steps = self.steps_per_epoch * config.eval_every_epochs
    self.checkpoints = checkpoints.RunCheckpoints(workdir)
    self.writer = None  # Created by `train`: evaluation alone writes no event file.
    self.parallel = parallel.DataParallel.over_all_devices()
    self.local_rows = self.parallel.local_rows(config.batch_size)
    self.train_chunk = make_train_chunk(self.model, self.tx, source, config.seed, self.parallel)
    self.eval_step = make_eval_step(self.model, source, self.parallel)
    self.picture = source.make_picture(self.model)
    self.kernel_log_det = jax.jit(
        lambda params: self.model.apply({"params": params}, method=fr.FlowMLP.kernel_log_abs_det)
    )

  def make_initial_state(self) -> TrainState:
    """The initial state, replicated over the mesh."""
    make = lambda: initial_state(self.model, self.tx, self.splits.num_features, self.config.seed)
    return jax.jit(make, out_shardings=self.parallel.replicated)()

  def abstract_state(self) -> TrainState:
    return abstract_state(self.model, self.tx, self.splits.num_features, self.config.seed, self.parallel)

  def initial_or_restored_state(self) -> TrainState:
    state = self.checkpoints.restore_latest(self.abstract_state())
    if state is None:
      return self.make_initial_state()
    logging.info("Resumed from step %d.", int(state.step))
    return state.replace(loss_sum=jnp.zeros_like(state.loss_sum))  # Its window began before the restart.

  def train(self, state: TrainState) -> TrainState:
    """Train steps from `state.step` until `num_epochs` or early stopping."""
    config = self.config
    self.writer = metric_writers.create_default_writer(self.workdir, just_logging=jax.process_index() > 0)
    if int(state.step) == 0:
      self.writer.write_hparams({k: str(v) if isinstance(v, tuple) else v for k, v in config.items()})
    report_progress = periodic_actions.ReportProgress(num_train_steps=self.total_steps, writer=self.writer)
    validation_y = np.asarray(
        data.eval_array(self.source, self.splits.validation, config.seed, data.VALIDATION_NOISE))
    step = int(state.step)
    last_log_step, last_log_time = step, time.perf_counter()
    stop = int(state.evals_since_best) >= config.patience
    crossed = lambda every, before, after: every > 0 and after // every > before // every
    while step < self.total_steps and not stop:
      epoch, skip = divmod(step, self.steps_per_epoch)
      local_chunks = data.train_chunks(self.splits, config, epoch, skip, self.local_rows)
      put = lambda local_chunk: self.parallel.put_chunk(local_chunk, config.batch_size)
      for chunk in data.prefetch_to_device(local_chunks, put):
        state = self.train_chunk(state, chunk, epoch)
        previous, step = step, step + chunk["batch_index"].shape[0]
        report_progress(step)
        # Chunks end at epoch ends; the last step is always evaluated.
        is_eval_step = step % self.eval_every_steps == 0 or step == self.total_steps
        is_log_step = is_eval_step or crossed(config.log_every_steps, previous, step)
        is_checkpoint_step = crossed(config.checkpoint_every_steps, previous, step)
        if not (is_log_step or is_checkpoint_step):
          continue
        # Nothing is logged or saved before this check: checkpoints only hold healthy states.
        window_nll = float(state.loss_sum) / (step - last_log_step) - float(self.kernel_log_det(state.params))
        divergence = self._divergence(state, window_nll, last_log_step, step)
        if divergence:
          state = self._recover(state, *divergence)
          step = int(state.step)
          last_log_step, last_log_time = step, time.perf_counter()
          break  # Restart the data stream at the restored step.
        if is_log_step:
          now = time.perf_counter()
          self.writer.write_scalars(step, {
              "train/nll": window_nll,
              "train/examples_per_sec": (step - last_log_step) * config.batch_size / (now - last_log_time),
              "train/learning_rate": float(self.schedule(step)) * float(state.learning_rate_scale),
          })
          state = state.replace(
              loss_sum=jnp.zeros_like(state.loss_sum),
              lowest_train_nll=jnp.minimum(state.lowest_train_nll, window_nll),
          )
          last_log_step, last_log_time = step, now
        if is_eval_step:
          state = self._evaluate_and_checkpoint(state, validation_y)
          stop = int(state.evals_since_best) >= config.patience
          last_log_time = time.perf_counter()  # Evaluation time is not training throughput.
        elif is_checkpoint_step:
          self.checkpoints.save_latest(step, state)
        if step >= self.total_steps or stop:
          break
    return state

  def _divergence(self, state: TrainState, window_nll: float, last_log_step: int,
                  step: int) -> tuple[str, int] | None:
    """None, or why training diverged and the last step whose parameters are trustworthy.

    A non-finite loss at step b condemns the parameters after update b−1, so a state of step
    ≤ b−2 is good. A window-mean NLL more than `divergence_nats` above the lowest so far
    condemns the window (last_log_step, step]; states before its start are kept.
    """
    bad_step = int(state.first_nonfinite_step)
    if bad_step >= 0:
      return f"the training loss became non-finite at step {bad_step}", bad_step - 2
    lowest = float(state.lowest_train_nll)
    if self.config.divergence_nats > 0 and window_nll > lowest + self.config.divergence_nats:
      return (f"the mean training NLL of steps {last_log_step + 1}-{step} is {window_nll:.1f}, more "
              f"than divergence_nats={self.config.divergence_nats} above the lowest so far "
              f"({lowest:.1f})"), last_log_step - 1
    return None

  def _recover(self, state: TrainState, problem: str, good_step: int) -> TrainState:
    """Raises FloatingPointError, or (on_divergence="restore") returns the newest saved state
    of step ≤ good_step (or the initial one) with the learning rate scaled by
    `divergence_lr_factor`."""
    config = self.config
    self.checkpoints.wait_until_finished()
    if config.on_divergence != "restore" or int(state.divergences) >= config.max_divergences:
      raise FloatingPointError(
          f"Training diverged: {problem}. Checkpoints hold only states saved before it was "
          f"detected ({self.checkpoints.latest.directory}); lower config.learning_rate, set "
          "config.clip_norm or config.warmup_steps, or set config.on_divergence='restore'."
      )
    restored = self.checkpoints.restore_latest(self.abstract_state(), at_most_step=good_step)
    restored = self.make_initial_state() if restored is None else restored
    self.checkpoints.discard_latest_after(int(restored.step))
    restored = restored.replace(
        loss_sum=jnp.zeros_like(restored.loss_sum),
        learning_rate_scale=state.learning_rate_scale * config.divergence_lr_factor,
        divergences=state.divergences + 1,
    )
    logging.warning("Training diverged: %s. Continuing from step %d with the learning rate scaled "
                    "by %g.", problem, int(restored.step), float(restored.learning_rate_scale))
    self.writer.write_scalars(int(restored.step), {
        "train/divergences": int(restored.divergences),
        "train/learning_rate_scale": float(restored.learning_rate_scale),
    })
    return restored

  def _evaluate_and_checkpoint(self, state: TrainState, validation_y: np.ndarray) -> TrainState:
    """Validation metrics, diagnostics and the picture; saves latest and (if improved) best."""
    step = int(state.step)
    metrics = evaluate(self.eval_step, state.params, validation_y, self.config.eval_batch_size,
                       self.parallel.put_batch)
    improved = metrics["ll"] > float(state.best_validation_ll)
    state = state.replace(
        best_validation_ll=jnp.maximum(state.best_validation_ll, metrics["ll"]),
        evals_since_best=jnp.where(improved, 0, state.evals_since_best + 1),
    )
    if improved:
      self.checkpoints.save_best(step, state.params, metrics["ll"])
    self.checkpoints.save_latest(step, state)
    self.writer.write_scalars(step, {f"validation/{k}": v for k, v in metrics.items()})
    self.writer.write_scalars(step, kernel_diagnostics(state.params))
    if self.picture is not None:
      sample_rng = jax.random.fold_in(jax.random.PRNGKey(self.config.seed + 1), step)
      picture = self.picture(state.params, sample_rng)
      self.writer.write_images(step, {self.source.picture_name: picture[None]})
      if jax.process_index() == 0:
        save_png(os.path.join(self.workdir, f"{self.source.picture_name}.png"), picture)
    logging.info("step %d: validation %s", step, describe(metrics))
    return state

  def test_best(self) -> dict[str, float]:
    """Test metrics of the best-by-validation params (restored from their checkpoint)."""
    abstract_params = self.abstract_state().params
    step, params = self.checkpoints.restore_best_params(abstract_params)
    test_y = np.asarray(data.eval_array(self.source, self.splits.test, self.config.seed, data.TEST_NOISE))
    metrics = evaluate(self.eval_step, params, test_y, self.config.eval_batch_size, self.parallel.put_batch)
    metrics["step"] = step
    logging.info("test (best checkpoint, step %d): %s", step, describe(metrics))
    return metrics


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains until `num_epochs` or early stopping; returns the best checkpoint's test metrics.

  Resumes from `<workdir>/checkpoints/latest` if present, with the same data order and
  noise as an uninterrupted run.
  """
  validate_config(config)
  workdir = os.path.abspath(workdir)
  source = data.load_source(config)
  checkpoints.record_config(config, workdir)
  run = _Run(config, workdir, source)
  try:
    state = run.train(run.initial_or_restored_state())
  finally:  # Also on errors and Ctrl-C: let in-flight (atomic) checkpoint writes finish.
    run.checkpoints.wait_until_finished()
  test_metrics = run.test_best()
  run.writer.write_scalars(int(state.step), {f"test/{k}": v for k, v in test_metrics.items() if k != "step"})
  run.writer.flush()
  return test_metrics


def evaluate_best(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Test log-likelihood ± 2 SE (and bits/dim for images) of the best checkpoint in `workdir`."""
  validate_config(config)
  workdir = os.path.abspath(workdir)
  return _Run(config, workdir, data.load_source(config)).test_best()
