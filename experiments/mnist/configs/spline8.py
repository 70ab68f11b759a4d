"""8-layer dense flow with learned elementwise splines: `dense8`'s optimiser (Adam 5e-4, 4000
warm-up steps, cosine decay, clipping at 5e4, α = 0.5) plus a monotone rational-quadratic
spline (8 bins on [−14, 14], the range of MNIST in logit space) on every coordinate before
each dense layer, over 80 epochs.
`python -m experiments.mnist --workdir=runs/spline8 --config=experiments/mnist/configs/spline8.py`."""

from experiments.mnist.configs import dense8


def get_config():
  config = dense8.get_config()
  config.spline_bins = 8
  config.spline_bound = 14.0
  config.num_epochs = 80
  return config
