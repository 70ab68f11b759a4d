"""Preparing tfds datasets offline: two datasets whose original files share names, one data_dir.

MNIST-format datasets (mnist, fashion_mnist, kmnist) all ship `train-images-idx3-ubyte.gz` etc.
Two small builders of that kind, defined here with the checksums of tiny IDX files written by
the test, are prepared from their own manual dirs into one data_dir by the program's own
preparation (`images.load_splits`); each must hold its own images.
"""

import gzip
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from experiments import images
from experiments.mnist.configs import default

FILES = {
  "train_images": "train-images-idx3-ubyte.gz",
  "train_labels": "train-labels-idx1-ubyte.gz",
  "test_images": "t10k-images-idx3-ubyte.gz",
  "test_labels": "t10k-labels-idx1-ubyte.gz",
}
NUM_EXAMPLES = 6


def read_idx(path: str) -> np.ndarray:
  """An IDX file (images: magic 0x803, count, rows, columns; labels: magic 0x801, count) as uint8."""
  with open(path, "rb") as file:
    raw = file.read()
  dims = raw[3]
  shape = np.frombuffer(raw[4 : 4 + 4 * dims], ">u4")
  return np.frombuffer(raw[4 + 4 * dims :], np.uint8).reshape(shape)


class _IdxDigits(tfds.core.GeneratorBasedBuilder):
  """An MNIST-format dataset read from four IDX .gz files (tfds extracts them)."""

  VERSION = tfds.core.Version("1.0.0")
  URL = ""  # Set by each subclass: where the four files would be downloaded from.
  url_infos = {}  # Set by the test from the files it writes, as tfds' registered checksums.

  def _info(self):
    return tfds.core.DatasetInfo(
      builder=self,
      features=tfds.features.FeaturesDict(
        {
          "image": tfds.features.Image(shape=(28, 28, 1)),
          "label": tfds.features.ClassLabel(num_classes=10),
        }
      ),
    )

  def _split_generators(self, dl_manager):
    paths = dl_manager.download_and_extract({key: self.URL + name for key, name in FILES.items()})
    return {
      split: self._generate_examples(paths[f"{split}_images"], paths[f"{split}_labels"])
      for split in ("train", "test")
    }

  def _generate_examples(self, images_path, labels_path):
    for index, (image, label) in enumerate(
      zip(read_idx(images_path), read_idx(labels_path), strict=True)
    ):
      yield index, {"image": image[..., None], "label": int(label)}


class IdxDigitsA(_IdxDigits):
  URL = "https://a.invalid/"


class IdxDigitsB(_IdxDigits):
  URL = "https://b.invalid/"


def write_idx_files(folder, builder_class, images_value: int):
  """Writes the four files (every pixel = images_value) and registers their checksums."""
  os.makedirs(folder)
  images_header = np.array([0x803, NUM_EXAMPLES, 28, 28], ">u4").tobytes()
  labels_header = np.array([0x801, NUM_EXAMPLES], ">u4").tobytes()
  contents = {
    "images": images_header + bytes([images_value]) * (NUM_EXAMPLES * 28 * 28),
    "labels": labels_header + bytes(range(NUM_EXAMPLES)),
  }
  url_infos = {}
  for key, name in FILES.items():
    path = os.path.join(folder, name)
    with gzip.open(path, "wb") as file:
      file.write(contents[key.split("_")[1]])
    url_infos[builder_class.URL + name] = tfds.download.checksums.compute_url_info(path)
    url_infos[builder_class.URL + name].filename = name  # tfds looks for manual_dir/<filename>.
  builder_class.url_infos = url_infos


@pytest.fixture(autouse=True)
def checksums_of_written_files():
  yield
  IdxDigitsA.url_infos = IdxDigitsB.url_infos = {}


def test_second_dataset_with_identically_named_files_gets_its_own_images(tmp_path):
  write_idx_files(tmp_path / "manual_a", IdxDigitsA, images_value=10)
  write_idx_files(tmp_path / "manual_b", IdxDigitsB, images_value=200)
  for name, manual_dir, value in [
    ("idx_digits_a", "manual_a", 10),
    ("idx_digits_b", "manual_b", 200),
  ]:
    config = default.get_config()
    config.update(
      dataset=name,
      data_dir=str(tmp_path / "tfds"),
      manual_dir=str(tmp_path / manual_dir),
      train_split="train",
      validation_split="test",
      test_split="test",
    )
    splits = images.load_splits(config)
    test_images = np.stack(list(splits.test.as_numpy_iterator()))
    assert test_images.shape == (NUM_EXAMPLES, 784)
    assert np.all(test_images == value), (name, np.unique(test_images))
  assert os.listdir(tmp_path / "tfds" / "downloads" / "extracted") == []  # Nothing left to reuse.
