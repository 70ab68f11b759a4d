"""4-layer dense flow with a gentler schedule than `dense4`: half the peak learning rate, a
twice longer warm-up, 150 epochs of cosine decay.
`python -m experiments.mnist --workdir=runs/dense4_long --config=experiments/mnist/configs/dense4_long.py`."""

from experiments.mnist.configs import dense4


def get_config():
  config = dense4.get_config()
  config.learning_rate = 5e-4
  config.warmup_steps = 4000
  config.num_epochs = 150
  config.eval_every_epochs = 3
  return config
