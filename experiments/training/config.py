"""The fields every run has (model, optimisation, divergence, logging, devices), and their checks.

A dataset's config adds its data fields (`data_source`, `dataset`, ...) to `base_config()`;
the data source checks those.
"""

import ml_collections


def base_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  # Model.
  config.num_layers = 2
  config.alpha = 0.01  # Smooth leaky ReLU slope.
  config.use_bias = True
  config.kernel_init = "orthogonal"  # or "near_identity"
  # Learned elementwise rational-quadratic splines before every dense layer (0: none), acting
  # on [-spline_bound, spline_bound] and the identity outside; spline_placement = "input": one
  # spline, before the first layer only (both ignored without bins).
  config.spline_bins = 0
  config.spline_bound = 4.0
  config.spline_placement = "every_layer"
  # Optimisation.
  config.learning_rate = 1e-4  # Peak learning rate of Adam.
  config.lr_schedule = "constant"  # or "cosine": decay to final_lr_fraction·lr at the last step.
  config.warmup_steps = 0  # Linear warm-up from 0.
  config.final_lr_fraction = 0.0
  config.clip_norm = 0.0  # Clip the relative gradient's global norm (0: off).
  config.batch_size = 10
  config.steps_per_call = 50  # Train steps per jitted call (lax.scan): amortises host overhead.
  config.num_epochs = 10
  config.patience = 5  # Evaluations without validation improvement before stopping.
  # Evaluate (and keep as best, and sample from) an exponential moving average of the
  # parameters with this decay, warmed up as in steps.make_train_step; 0: the parameters.
  config.ema_decay = 0.0
  config.seed = 0
  # Divergence: a non-finite loss, or (divergence_nats > 0) a logged window-mean training NLL
  # more than divergence_nats above the lowest so far (before the first window: the initial
  # parameters' validation NLL). "stop" raises; "restore" reloads the last good checkpoint and
  # scales the learning rate by divergence_lr_factor (max_divergences times). 1000 nats: every
  # shipped MNIST run beyond the paper's ran with it and never triggered it (see the README).
  config.on_divergence = "stop"
  config.divergence_nats = 1000.0
  config.divergence_lr_factor = 0.5
  config.max_divergences = 3
  # Logging, evaluation, checkpoints.
  config.log_every_steps = 500
  config.eval_every_epochs = 1
  config.checkpoint_every_steps = 0  # Extra resumable checkpoints between evaluations (0: none).
  config.eval_batch_size = 1000
  # Several hosts (see experiments/training/parallel.py); "" = this process alone. The batch is
  # sharded over all devices of all hosts either way.
  config.coordinator_address = ""  # e.g. "10.0.0.1:1234", the address of process 0.
  config.num_processes = 1
  config.process_id = 0
  return config


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first out-of-range field of `base_config()`."""
  for field in (
    "batch_size",
    "steps_per_call",
    "num_epochs",
    "log_every_steps",
    "eval_every_epochs",
    "eval_batch_size",
    "patience",
  ):
    if int(config[field]) < 1:
      raise ValueError(f"config.{field} must be a positive integer, got {config[field]}.")
  if config.seed < 0:
    raise ValueError(f"config.seed must be >= 0, got {config.seed}.")
  if config.checkpoint_every_steps < 0 or config.checkpoint_every_steps % config.log_every_steps:
    raise ValueError(
      f"config.checkpoint_every_steps must be 0 or a multiple of config.log_every_steps "
      f"({config.log_every_steps}), got {config.checkpoint_every_steps}: the divergence check "
      "condemns the steps since the last logged one, and a restore needs a checkpoint from "
      "before them."
    )
  if not 0 < config.learning_rate < float("inf"):
    raise ValueError(
      f"config.learning_rate must be positive and finite, got {config.learning_rate}."
    )
  if not 0.0 <= config.final_lr_fraction <= 1.0:
    raise ValueError(
      f"config.final_lr_fraction must lie in [0, 1] (the cosine schedule decays to it), got "
      f"{config.final_lr_fraction}."
    )
  if config.on_divergence not in ("stop", "restore"):
    raise ValueError(
      f"config.on_divergence={config.on_divergence!r} is not one of ['restore', 'stop']."
    )
  if not 0.0 <= config.ema_decay < 1.0:
    raise ValueError(f"config.ema_decay must lie in [0, 1), got {config.ema_decay}.")
  if not 0.0 < config.divergence_lr_factor < 1.0:
    raise ValueError(
      f"config.divergence_lr_factor must lie in (0, 1), got {config.divergence_lr_factor}."
    )
  for field in ("warmup_steps", "clip_norm", "divergence_nats", "max_divergences"):
    if config[field] < 0:
      raise ValueError(f"config.{field} must be >= 0, got {config[field]}.")
