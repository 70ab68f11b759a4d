"""`spline16` (8 dense layers, each after a 16-bin spline on [−14, 14]; Adam 5e-4, 4000
warm-up steps, cosine decay) in a 60-minute run on a 2-core CPU: 50 epochs. The 60-minute row
of `python -m experiments.flowjax_benchmark`.
`python -m experiments.mnist --workdir=runs/spline16_60min --config=experiments/mnist/configs/spline16_60min.py`."""

from experiments.mnist.configs import spline16


def get_config():
  config = spline16.get_config()
  config.num_epochs = 50
  return config
