"""Maximum-likelihood training of a dense flow with relative gradients, for any `DataSource`.

`train_and_evaluate(config, workdir)` runs the CLU loop: jitted relative-gradient steps
(`steps`), TensorBoard metrics, the source's picture (sample grid, 2-D density), Orbax
checkpoints (latest state for resuming, best parameters by validation likelihood), early
stopping, divergence handling, and a final test evaluation of the best parameters
(docs/method.md, "Validation and test protocol"). Every dataset goes through this one loop;
`config.data_source` picks the data (`data.load_source`). One run at a time holds a workdir
(`workdir_lock`).
"""

from __future__ import annotations

import contextlib
import os
import time

from absl import logging
from clu import metric_writers
from clu import periodic_actions
import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import ml_collections
import numpy as np

from experiments.training import checkpoints
from experiments.training import config as config_lib
from experiments.training import data
from experiments.training import evaluation
from experiments.training import layer_report
from experiments.training import parallel
from experiments.training import steps
from experiments.training import workdir_lock


def save_png(path: str, picture: np.ndarray) -> None:
  """Writes a (H, W, C) picture in [0, 1] (grey, RGB or RGBA) as a PNG, atomically."""
  temporary = path + ".tmp.png"
  image = picture[..., 0] if picture.shape[-1] == 1 else picture
  plt.imsave(temporary, image, cmap="gray", vmin=0.0, vmax=1.0)
  os.replace(temporary, path)


def crossed(every: int, before: int, after: int) -> bool:
  """Whether the steps (before, after] include a multiple of `every` (never if every ≤ 0).

  The loop advances a chunk of `steps_per_call` steps at a time and steps back after a
  divergence restore, so CLU's `periodic_actions.PeriodicCallback(every_steps=...)`, which must
  see every step once and in order (it raises otherwise), does not fit.
  """
  return every > 0 and after // every > before // every


class Run:
  """One training run: the model, its jitted functions, data, writer and checkpoints."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, source: data.DataSource):
    self.config, self.workdir, self.source = config, workdir, source
    splits = self.splits = source.splits
    self.steps_per_epoch = splits.num_train // config.batch_size
    if self.steps_per_epoch < 1:
      raise ValueError(f"The training split has {splits.num_train} examples, fewer than one batch.")
    self.total_steps = self.steps_per_epoch * config.num_epochs
    self.model, self.tx = (
      steps.create_model(config),
      steps.create_optimizer(config, self.total_steps),
    )
    self.eval_every_steps = self.steps_per_epoch * config.eval_every_epochs
    self.checkpoints = checkpoints.RunCheckpoints(workdir)
    self.writer = None  # Created by `train`: evaluation alone writes no event file.
    self.parallel = parallel.DataParallel.over_all_devices()
    self.ema = config.ema_decay > 0  # The state keeps averaged params; they are evaluated.
    self.train_chunk = steps.make_train_chunk(
      self.model, self.tx, source, config.seed, self.parallel, config.ema_decay
    )
    self.eval_step = steps.make_eval_step(self.model, source, self.parallel)
    self.kernel_log_abs_det = steps.make_kernel_log_abs_det(self.model)
    self.picture = source.make_picture(self.model)

  def close(self) -> None:
    """Lets in-flight checkpoint saves finish and flushes the writer (also after errors)."""
    self.checkpoints.close()
    if self.writer is not None:
      self.writer.close()

  def make_initial_state(self) -> steps.TrainState:
    """The initial state, replicated over the mesh."""
    make = lambda: steps.initial_state(
      self.model, self.tx, self.splits.num_features, self.config.seed, self.ema
    )
    return jax.jit(make, out_shardings=self.parallel.replicated)()

  def abstract_state(self) -> steps.TrainState:
    return steps.abstract_state(
      self.model, self.tx, self.splits.num_features, self.config.seed, self.parallel, self.ema
    )

  def evaluate(self, params, y: np.ndarray) -> dict[str, float]:
    return evaluation.evaluate(
      self.eval_step, params, y, self.config.eval_batch_size, self.parallel.put_batch
    )

  def fresh_state(self, validation_y: np.ndarray) -> steps.TrainState:
    """The initial state, with its validation NLL as the divergence reference until the first
    logged window (so a run that explodes within its first window is caught too)."""
    state = self.make_initial_state()
    initial_nll = -self.evaluate(state.params, validation_y)["ll"]
    logging.info(
      "Initial validation NLL %.2f: the divergence reference until the first logged window.",
      initial_nll,
    )
    return state.replace(lowest_train_nll=jnp.full_like(state.lowest_train_nll, initial_nll))

  def initial_or_restored_state(self, validation_y: np.ndarray) -> steps.TrainState:
    """The newest readable checkpoint's state, or the fresh state."""
    state = self.checkpoints.restore_latest(self.abstract_state())
    if state is None:
      return self.fresh_state(validation_y)
    logging.info("Resumed from step %d.", int(state.step))
    return state.replace(
      loss_sum=jnp.zeros_like(state.loss_sum)
    )  # Its window began before the restart.

  def train(self, state: steps.TrainState, validation_y: np.ndarray) -> steps.TrainState:
    """Train steps from `state.step` until `num_epochs` or early stopping."""
    config = self.config
    self.writer = metric_writers.create_default_writer(
      self.workdir, just_logging=jax.process_index() > 0
    )
    if int(state.step) == 0:
      self.writer.write_hparams(
        {k: str(v) if isinstance(v, tuple) else v for k, v in config.items()}
      )
    # steps_per_sec and the ETA, from wall-clock time; a new one after a divergence restore, since
    # it measures from the step it last reported at and would report negative rates.
    make_report_progress = lambda: periodic_actions.ReportProgress(
      num_train_steps=self.total_steps, writer=self.writer
    )
    report_progress = make_report_progress()
    step = int(state.step)
    last_log_step, last_log_time = step, time.perf_counter()
    stop = int(state.evals_since_best) >= config.patience
    while step < self.total_steps and not stop:
      epoch, skip = divmod(step, self.steps_per_epoch)
      for chunk in data.device_chunks(self.splits, config, epoch, self.parallel, skip):
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
        window_nll = float(state.loss_sum) / (step - last_log_step) - float(
          self.kernel_log_abs_det(state.params)
        )
        divergence = self._divergence(state, window_nll, last_log_step, step)
        if divergence:
          state = self._recover(state, *divergence, validation_y)
          step = int(state.step)
          last_log_step, last_log_time = step, time.perf_counter()
          report_progress = make_report_progress()
          break  # Restart the data stream at the restored step.
        if is_log_step:
          now = time.perf_counter()
          self.writer.write_scalars(
            step,
            {
              "train/nll": window_nll,
              # Training alone: unlike ReportProgress's steps_per_sec, without evaluation time.
              "train/examples_per_sec": (step - last_log_step)
              * config.batch_size
              / (now - last_log_time),
              "train/learning_rate": steps.learning_rate(state),
            },
          )
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

  def _divergence(
    self, state: steps.TrainState, window_nll: float, last_log_step: int, step: int
  ) -> tuple[str, int] | None:
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
      return (
        f"the mean training NLL of steps {last_log_step + 1}-{step} is {window_nll:.6g}, more "
        f"than divergence_nats={self.config.divergence_nats} above the lowest so far "
        f"({lowest:.6g})"
      ), last_log_step - 1
    return None

  def _recover(
    self, state: steps.TrainState, problem: str, good_step: int, validation_y: np.ndarray
  ) -> steps.TrainState:
    """Raises FloatingPointError, or (on_divergence="restore") returns the newest saved state
    of step ≤ good_step (or the fresh one) with the learning rate scaled by
    `divergence_lr_factor`. Its divergence reference is its own: windows of the diverged stretch
    (whose NLL mixes losses and log-determinants of very different parameters) do not count."""
    config = self.config
    self.checkpoints.wait_until_finished()
    if config.on_divergence != "restore" or int(state.divergences) >= config.max_divergences:
      retries = (
        f"all config.max_divergences={config.max_divergences} restores were used"
        if config.on_divergence == "restore"
        else "or set config.on_divergence='restore'"
      )
      raise FloatingPointError(
        f"Training diverged: {problem}. Checkpoints hold only states saved before it was "
        f"detected ({self.checkpoints.latest.directory}); lower config.learning_rate, set "
        f"config.clip_norm or config.warmup_steps ({retries})."
      )
    restored = self.checkpoints.restore_latest(self.abstract_state(), at_most_step=good_step)
    restored = self.fresh_state(validation_y) if restored is None else restored
    # The diverged stretch's checkpoints go: its latest states, and a best one that the
    # restored state's best_validation_ll does not know of (Orbax would then skip saving every
    # best step up to it).
    self.checkpoints.discard_after(int(restored.step))
    restored = steps.with_learning_rate_scale(
      restored, steps.learning_rate_scale(state) * config.divergence_lr_factor
    )
    restored = restored.replace(
      loss_sum=jnp.zeros_like(restored.loss_sum),
      divergences=state.divergences + 1,
    )
    scale = steps.learning_rate_scale(restored)
    logging.warning(
      "Training diverged: %s. Continuing from step %d with the learning rate scaled by %g.",
      problem,
      int(restored.step),
      scale,
    )
    self.writer.write_scalars(
      int(restored.step),
      {
        "train/divergences": int(restored.divergences),
        "train/learning_rate_scale": scale,
      },
    )
    return restored

  def _evaluate_and_checkpoint(
    self, state: steps.TrainState, validation_y: np.ndarray
  ) -> steps.TrainState:
    """Validation metrics, diagnostics and the picture of the evaluated params (the average
    with `ema_decay`); saves latest and (if improved) best."""
    step = int(state.step)
    params = steps.evaluation_params(state)
    metrics = self.evaluate(params, validation_y)
    improved = metrics["ll"] > float(state.best_validation_ll)
    state = state.replace(
      best_validation_ll=jnp.maximum(state.best_validation_ll, metrics["ll"]),
      evals_since_best=jnp.where(improved, 0, state.evals_since_best + 1),
    )
    if improved:
      self.checkpoints.save_best(step, params, metrics["ll"])
    self.checkpoints.save_latest(step, state)
    self.writer.write_scalars(step, {f"validation/{k}": v for k, v in metrics.items()})
    self.writer.write_scalars(step, evaluation.kernel_diagnostics(params))
    if self.picture is not None:
      sample_rng = jax.random.fold_in(jax.random.PRNGKey(self.config.seed + 1), step)
      picture = self.picture(params, sample_rng)
      self.writer.write_images(step, {self.source.picture_name: picture[None]})
      if jax.process_index() == 0:
        save_png(os.path.join(self.workdir, f"{self.source.picture_name}.png"), picture)
    logging.info("step %d: validation %s", step, evaluation.describe(metrics))
    return state

  def validation_y(self) -> np.ndarray:
    return np.asarray(
      data.eval_array(self.source, self.splits.validation, self.config.seed, data.VALIDATION_NOISE)
    )

  def test_best(self) -> dict[str, float]:
    """Test metrics of the best-by-validation params (restored from their checkpoint)."""
    step, params = self.checkpoints.restore_best_params(self.abstract_state().params)
    test_y = np.asarray(
      data.eval_array(self.source, self.splits.test, self.config.seed, data.TEST_NOISE)
    )
    metrics = self.evaluate(params, test_y)
    metrics["step"] = step
    logging.info("test (best checkpoint, step %d): %s", step, evaluation.describe(metrics))
    return metrics


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains until `num_epochs` or early stopping; returns the best checkpoint's test metrics.

  Resumes from the newest readable checkpoint in `<workdir>/checkpoints/latest` if there is
  one, with the same data order and noise as an uninterrupted run. Refuses a workdir that
  another live run holds (`workdir_lock.WorkdirLockedError`).
  """
  config_lib.validate_config(config)
  workdir = os.path.abspath(workdir)
  # Every process of a multi-host run shares the workdir: process 0 holds the lock for all.
  lock = workdir_lock.hold(workdir) if jax.process_index() == 0 else contextlib.nullcontext()
  with lock:
    checkpoints.check_config(config, workdir)
    source = data.load_source(config)
    run = Run(config, workdir, source)
    try:
      validation_y = run.validation_y()
      state = run.initial_or_restored_state(validation_y)
      checkpoints.record_config(config, workdir)
      state = run.train(state, validation_y)
      run.checkpoints.wait_until_finished()
      test_metrics = run.test_best()
      run.writer.write_scalars(
        int(state.step), {f"test/{k}": v for k, v in test_metrics.items() if k != "step"}
      )
    finally:  # Also on errors and Ctrl-C.
      run.close()
  return test_metrics


def evaluate_best(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Test log-likelihood ± 2 SE (and bits/dim for images) of the best checkpoint in `workdir`."""
  run = _evaluation_run(config, workdir)
  try:
    return run.test_best()
  finally:
    run.close()


def report_layers(config: ml_collections.ConfigDict, workdir: str) -> str:
  """The best checkpoint's per-layer log-likelihood terms on the validation split, as a table
  (`layer_report`)."""
  run = _evaluation_run(config, workdir)
  try:
    step, params = run.checkpoints.restore_best_params(run.abstract_state().params)
    report = layer_report.layer_report(run.model, params, run.validation_y())
    return f"best checkpoint (step {step}), validation split:\n{layer_report.describe(*report)}"
  finally:
    run.close()


def _evaluation_run(config: ml_collections.ConfigDict, workdir: str) -> Run:
  """A `Run` on a trained workdir for evaluation, refusing a workdir without a best checkpoint
  (before anything is created in it) or whose config.json names another model or data."""
  config_lib.validate_config(config)
  workdir = os.path.abspath(workdir)
  best = os.path.join(workdir, "checkpoints", "best")
  if not os.path.isdir(best) or not os.listdir(best):
    raise FileNotFoundError(f"No best checkpoint in {best}; train first with this --workdir.")
  checkpoints.check_config(config, workdir, checkpoints.EVALUATION_FIELDS)
  return Run(config, workdir, data.load_source(config))
