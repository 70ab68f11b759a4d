"""`dense2_best` with a 300-epoch cosine schedule (its best epoch was the last of 120).
`python -m experiments.mnist --workdir=runs/dense2_long --config=experiments/mnist/configs/dense2_long.py`."""

from experiments.mnist.configs import dense2_best


def get_config():
  config = dense2_best.get_config()
  config.num_epochs = 300
  config.eval_every_epochs = 5
  return config
