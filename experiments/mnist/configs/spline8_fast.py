"""`spline8` in 3 epochs: the same model and peak learning rate, a 500-step warm-up and cosine
decay over 1500 steps; the README's time-to-quality row.
`python -m experiments.mnist --workdir=runs/spline8_fast --config=experiments/mnist/configs/spline8_fast.py`."""

from experiments.mnist.configs import spline8


def get_config():
  config = spline8.get_config()
  config.warmup_steps = 500
  config.num_epochs = 3
  config.eval_every_epochs = 1
  return config
