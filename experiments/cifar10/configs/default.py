"""CIFAR-10 (tfds `cifar10`, D = 3072): the MNIST `dense2_best` recipe (2 layers, α = 0.3,
near-identity init, batch 100, Adam 1e-3 with warm-up and cosine decay) for 100 epochs, with
logit λ = 0.05 and horizontal-flip augmentation; the last 5000 training images are the
validation split."""

import ml_collections

from experiments.mnist.configs import dense2_best


def get_config() -> ml_collections.ConfigDict:
  config = dense2_best.get_config()
  config.dataset = "cifar10"
  config.image_shape = (32, 32, 3)
  config.train_split = "train[:45000]"
  config.validation_split = "train[45000:]"
  config.test_split = "test"
  config.lam = 0.05
  config.flip_horizontal = True
  config.num_epochs = 100
  return config
