"""The paper's MNIST configuration (Gresele et al., 2020): 2 dense layers, batch 10, Adam 1e-4."""

import ml_collections

from experiments.training import config as base


def get_config() -> ml_collections.ConfigDict:
  config = base.base_config()
  # Data (docs/method.md, "Reporting units"): tfds images, dequantised and logit-transformed.
  config.data_source = "images"
  config.dataset = "mnist"
  config.image_shape = (28, 28, 1)
  config.train_split = "train[:50000]"
  config.validation_split = "train[50000:]"
  config.test_split = "test"
  config.data_dir = ""  # tfds data_dir; "" = tfds' default (~/tensorflow_datasets).
  config.manual_dir = ""  # Folder with the original files, to prepare tfds offline.
  config.download = False  # Let tfds download the dataset if it is not prepared.
  config.lam = 1e-6  # Logit transform y = logit(λ + (1−2λ)x).
  config.flip_horizontal = False  # Mirror training images left–right with probability 1/2.
  config.num_samples = 64  # Samples in the image grid written at each evaluation.
  return config
