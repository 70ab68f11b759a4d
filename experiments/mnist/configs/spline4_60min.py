"""`spline4_long` (4 dense layers, each after a 32-bin spline on [−14, 14]; Adam 5e-4, 4000
warm-up steps, cosine decay) over 180 epochs (90 000 steps): the 60-minute config of
`python -m experiments.flowjax_benchmark`, where it reached test 1.219 bits/dim in 37.5 minutes
on a fast day of a 2-core CPU. At the pace of `spline4_long`'s run, the slowest this model has
trained here, it would take about 85 minutes, and the benchmark would mark it over its budget.
`python -m experiments.mnist --workdir=runs/spline4_60min --config=experiments/mnist/configs/spline4_60min.py`."""

from experiments.mnist.configs import spline4_long


def get_config():
  config = spline4_long.get_config()
  config.num_epochs = 180
  return config
