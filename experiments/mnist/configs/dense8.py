"""8-layer dense flow: `dense4_long`'s optimiser (Adam 5e-4, 4000 warm-up steps, cosine decay,
global-norm clipping at 5e4) with α = 0.5 and 100 epochs: test 1.753 bits/dim in 52 minutes on
a 2-core CPU, the best spline-free row of the README's MNIST table (α = 0.5 was chosen by the recipe probe
listed there).
`python -m experiments.mnist --workdir=runs/dense8 --config=experiments/mnist/configs/dense8.py`."""

from experiments.mnist.configs import dense4_long


def get_config():
  config = dense4_long.get_config()
  config.num_layers = 8
  config.alpha = 0.5
  config.num_epochs = 100
  config.eval_every_epochs = 2
  return config
