"""A tiny configuration for end-to-end tests on `tfds.testing.mock_data`."""

from experiments.mnist.configs import default


def get_config():
  config = default.get_config()
  config.batch_size = 4
  config.steps_per_call = 3  # 4 steps per epoch on 16 mock examples: chunks of 3 and 1.
  config.num_epochs = 2
  config.log_every_steps = 2
  config.eval_batch_size = 8
  config.num_samples = 4
  return config
