"""`spline16`'s model (8 dense layers, each after a 16-bin spline on [−14, 14]) in a 5-minute
run on a 2-core CPU: 4 epochs, 500 warm-up steps, cosine decay, Adam 5e-4. The 5-minute row
of `python -m experiments.flowjax_benchmark`: test 1.519 bits/dim in 4.6 minutes.
`python -m experiments.mnist --workdir=runs/spline16_5min --config=experiments/mnist/configs/spline16_5min.py`."""

from experiments.mnist.configs import spline16


def get_config():
  config = spline16.get_config()
  config.num_epochs = 4
  config.warmup_steps = 500
  config.eval_every_epochs = 1
  return config
