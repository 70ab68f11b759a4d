"""4-layer dense flow that trains stably: the dense2_best setting plus global-norm clipping of
the relative gradient, a longer warm-up, and restore-on-divergence.
`python -m experiments.mnist --workdir=runs/dense4 --config=experiments/mnist/configs/dense4.py`."""

from experiments.mnist.configs import dense2_best


def get_config():
  config = dense2_best.get_config()
  config.num_layers = 4
  config.warmup_steps = 2000
  config.clip_norm = 5e4  # Relative-gradient norms at the start: median 2e4, p90 1e5, max 2e7.
  config.num_epochs = 60
  return config
