"""`spline16`'s model (8 dense layers, each after a 16-bin spline on [−14, 14]) in a 15-minute
run on a 2-core CPU: 13 epochs, 1000 warm-up steps, cosine decay, Adam 5e-4. The 15-minute
row of `python -m experiments.flowjax_benchmark`: test 1.386 bits/dim in 10.3 minutes.
`python -m experiments.mnist --workdir=runs/spline16_15min --config=experiments/mnist/configs/spline16_15min.py`."""

from experiments.mnist.configs import spline16


def get_config():
  config = spline16.get_config()
  config.num_epochs = 13
  config.warmup_steps = 1000
  config.eval_every_epochs = 2
  return config
