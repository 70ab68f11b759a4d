"""2-layer dense flow, beyond the paper: α = 0.3, near-identity init, batch 100, Adam 1e-3
with warm-up and cosine decay. `python -m experiments.mnist --workdir=runs/dense2_best
--config=experiments/mnist/configs/dense2_best.py` (see the README's results table)."""

from experiments.mnist.configs import default


def get_config():
  config = default.get_config()
  config.alpha = 0.3
  config.kernel_init = "near_identity"
  config.batch_size = 100
  config.learning_rate = 1e-3
  config.lr_schedule = "cosine"
  config.warmup_steps = 500
  config.num_epochs = 120
  config.patience = 1000  # Keep the whole cosine schedule; the best checkpoint is kept anyway.
  config.log_every_steps = 500
  config.eval_every_epochs = 2
  config.on_divergence = "restore"
  config.checkpoint_every_steps = 2500
  return config
