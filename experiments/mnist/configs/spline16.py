"""`spline8` with 16-bin splines and a 120-epoch schedule: the 8-layer dense flow with a
monotone rational-quadratic spline (16 bins on [−14, 14]) on every coordinate before each dense
layer, `dense8`'s optimiser (Adam 5e-4, 4000 warm-up steps, cosine decay, clipping at 5e4,
α = 0.5): test 1.216 bits/dim in 132 minutes on a 2-core CPU, the best row of the README's MNIST
table.
`python -m experiments.mnist --workdir=runs/spline16 --config=experiments/mnist/configs/spline16.py`."""

from experiments.mnist.configs import spline8


def get_config():
  config = spline8.get_config()
  config.spline_bins = 16
  config.num_epochs = 120
  return config
