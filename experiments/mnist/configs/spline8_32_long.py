"""`spline4_long` with twice the depth: 8 dense layers, each after a 32-bin spline on [−14, 14],
Adam 5e-4, 4000 warm-up steps, cosine decay over 280 epochs, sized to fit a working session on
a 2-core CPU: test 1.191 bits/dim in 129 minutes.
`python -m experiments.mnist --workdir=runs/spline8_32_long --config=experiments/mnist/configs/spline8_32_long.py`."""

from experiments.mnist.configs import spline4_long


def get_config():
  config = spline4_long.get_config()
  config.num_layers = 8
  config.num_epochs = 280
  config.eval_every_epochs = 10
  return config
