"""tfds image datasets → dequantised, logit-transformed batches (ENGINEERING.md §2).

Pixels p ∈ {0..255} become x = (p + u)/256 with u ~ U[0, 1), then y = logit(λ + (1−2λ)x).
tf.data streams shuffled uint8 batches, grouped into chunks of `steps_per_call` batches, to
the device; the dequantisation runs there, inside the jitted train step. Training noise is
fresh every epoch but a pure function of (seed, epoch, batch index), so a resumed run sees
exactly the batches an uninterrupted run would. Evaluation noise is fixed by the seed, so
validation and test numbers are reproducible.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

TRAIN_NOISE, VALIDATION_NOISE, TEST_NOISE = 0, 1, 2
"""Independent noise streams for the three splits."""


class DatasetNotFoundError(FileNotFoundError):
  """The tfds dataset is not prepared and the config gives no way to prepare it offline."""


@dataclasses.dataclass(frozen=True)
class Splits:
  """The three splits as cached uint8 image datasets, and their sizes."""

  train: tf.data.Dataset
  validation: tf.data.Dataset
  test: tf.data.Dataset
  num_train: int
  image_shape: tuple[int, int, int]

  @property
  def num_features(self) -> int:
    return math.prod(self.image_shape)


def _builder(config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
  try:
    builder = tfds.builder(config.dataset, data_dir=config.data_dir or None)
  except tfds.core.registered.DatasetNotFoundError as error:
    raise DatasetNotFoundError(
        f"tfds has no dataset named {config.dataset!r} (config.dataset); check the spelling."
    ) from error
  if builder.is_prepared():
    return builder
  if config.manual_dir:
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=config.manual_dir)
    )
  elif config.download:
    builder.download_and_prepare()
  else:
    raise DatasetNotFoundError(
        f"Dataset {config.dataset!r} is not prepared in data_dir {builder.data_dir!r}. "
        "Either set --config.manual_dir to a folder holding the dataset's original files "
        "(for MNIST the four IDX .gz files, e.g. ../shared/datasets/mnist), or "
        "--config.download=True to let tfds download it, or --config.data_dir to where it "
        "is already prepared."
    )
  return builder


def _images(builder: tfds.core.DatasetBuilder, split: str) -> tf.data.Dataset:
  return builder.as_dataset(split=split).map(lambda example: example["image"]).cache()


def _count(dataset: tf.data.Dataset) -> int:
  cardinality = int(dataset.cardinality())
  if cardinality >= 0:
    return cardinality
  return int(dataset.reduce(0, lambda count, _: count + 1))


def load_splits(config: ml_collections.ConfigDict) -> Splits:
  """Loads train/validation/test splits of `config.dataset`, checking the image format."""
  builder = _builder(config)
  image_feature = builder.info.features["image"]
  image_shape = tuple(image_feature.shape)
  if image_shape != tuple(config.image_shape) or image_feature.dtype != tf.uint8:
    raise ValueError(
        f"Dataset {config.dataset!r} has {image_feature.dtype.name} images of shape "
        f"{image_shape}, but config.image_shape is {tuple(config.image_shape)} uint8; this "
        "program models uint8 images of the configured shape."
    )
  train = _images(builder, config.train_split)
  return Splits(
      train=train,
      validation=_images(builder, config.validation_split),
      test=_images(builder, config.test_split),
      num_train=_count(train),
      image_shape=image_shape,
  )


def noise_key(seed: int | jax.Array, *counters: int | jax.Array) -> jax.Array:
  """A PRNG key that is a pure function of (seed, counters...): jit-able, traced counters ok."""
  key = jax.random.PRNGKey(seed)
  for counter in counters:
    key = jax.random.fold_in(key, counter)
  return key


def dequantize_and_logit(images: jax.Array, key: jax.Array, lam: float) -> jax.Array:
  """uint8 images (B, ...) → y (B, D) float32 with y = logit(λ + (1−2λ)(p + u)/256)."""
  images = images.reshape(images.shape[0], -1)
  x = (images.astype(jnp.float32) + jax.random.uniform(key, images.shape)) / 256.0
  s = lam + (1.0 - 2.0 * lam) * x
  return jnp.log(s) - jnp.log1p(-s)


def logit_to_pixels(y: jax.Array, lam: float) -> jax.Array:
  """Inverse of the logit transform: y → x ∈ [0, 1] (clipped), same shape."""
  return jnp.clip((jax.nn.sigmoid(y) - lam) / (1.0 - 2.0 * lam), 0.0, 1.0)


def bits_per_dim(log_prob_logit: jax.Array, y: jax.Array, lam: float) -> jax.Array:
  """Per-example bits/dim of the pixels from log p(y) in logit space (ENGINEERING.md §2).

  log p(pixels) = log p(y) + D·log(1−2λ) − Σ_i log(s_i(1−s_i)) − D·log 256, s = sigmoid(y).
  """
  num_features = y.shape[-1]
  log_jacobian = jax.nn.log_sigmoid(y) + jax.nn.log_sigmoid(-y)
  log_prob_pixels = (
      log_prob_logit + num_features * math.log1p(-2.0 * lam) - log_jacobian.sum(-1)
      - num_features * math.log(256.0)
  )
  return -log_prob_pixels / (num_features * math.log(2.0))


def train_chunks(
    splits: Splits, config: ml_collections.ConfigDict, epoch: int, skip_batches: int = 0,
    rows: slice = slice(None),
) -> tf.data.Dataset:
  """One epoch of shuffled uint8 training batches, `steps_per_call` batches per element.

  Each element is {"images": uint8 (k, b, D), "batch_index": int32 (k,)} with k ≤
  steps_per_call (the epoch's last chunk may be shorter) and b the number of `rows` of each
  global batch of `config.batch_size` that this host feeds (all by default); the remainder of
  the epoch that does not fill a batch is dropped. The order depends only on
  (config.seed, epoch), the same on every host; `skip_batches` skips the epoch's first
  batches (for resuming).
  """
  seed = int(np.random.SeedSequence([config.seed, epoch]).generate_state(1)[0])
  dataset = splits.train.shuffle(splits.num_train, seed=seed, reshuffle_each_iteration=False)
  dataset = dataset.batch(config.batch_size, drop_remainder=True).enumerate().skip(skip_batches)
  dataset = dataset.map(lambda index, images: {
      "images": tf.reshape(images, (config.batch_size, splits.num_features))[rows],
      "batch_index": tf.cast(index, tf.int32),
  })
  return dataset.batch(config.steps_per_call).prefetch(tf.data.AUTOTUNE)


def eval_array(
    dataset: tf.data.Dataset, config: ml_collections.ConfigDict, noise_stream: int
) -> jax.Array:
  """A whole evaluation split as y (N, D) on the device, dequantised with fixed seeded noise."""
  dequantize = jax.jit(dequantize_and_logit, static_argnums=2)
  chunks = [
      dequantize(images, noise_key(config.seed, noise_stream, index), config.lam)
      for index, images in enumerate(dataset.batch(1000).as_numpy_iterator())
  ]
  return jnp.concatenate(chunks, axis=0)


def prefetch_to_device(
    batches: tf.data.Dataset, put: Callable[[Any], Any] = jax.device_put, size: int = 2
) -> Iterator[Any]:
  """Yields `put(element)` (a transfer to the devices), `size` elements ahead of the consumer."""
  queue = []
  for batch in batches.as_numpy_iterator():
    queue.append(put(batch))
    if len(queue) > size:
      yield queue.pop(0)
  yield from queue
