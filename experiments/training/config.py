"""The fields every run has (model, optimisation, divergence, logging, devices); a dataset's
config adds its data fields (`data_source`, `dataset`, ...) to `base_config()`."""

import ml_collections


def base_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  # Model.
  config.num_layers = 2
  config.alpha = 0.01  # Smooth leaky ReLU slope.
  config.use_bias = True
  config.kernel_init = "orthogonal"  # or "near_identity"
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
  config.seed = 0
  # Divergence: a non-finite loss, or (divergence_nats > 0) a logged window-mean training NLL
  # more than divergence_nats above the lowest so far. "stop" raises; "restore" reloads the last
  # good checkpoint and scales the learning rate by divergence_lr_factor (max_divergences times).
  config.on_divergence = "stop"
  config.divergence_nats = 0.0
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
