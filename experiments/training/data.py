"""What a dataset gives the training loop, and how its batches reach the devices.

A `DataSource` holds three splits of flat raw records (D,) (see `Splits`) — uint8
pixels for images, float32 vectors for 2-D and tabular data — and says how a batch of raw
records becomes model inputs y (B, D) on the device (`preprocess`), which per-example
metrics besides the log-likelihood to report (`extra_metrics`), and what picture to draw
at each evaluation (`make_picture`). `load_source(config)` picks the source named by
`config.data_source`; each lives with its program: `experiments/images.py` (MNIST, CIFAR-10),
`experiments/toy/input_pipeline.py`, `experiments/tabular/input_pipeline.py`.

Shuffled raw batches, grouped into chunks of `steps_per_call` batches, stream to the devices
(through tf.data for tfds datasets, by numpy indexing for in-memory arrays); `preprocess`
runs there, inside the jitted train step. Its randomness
(dequantisation noise, augmentation) is a pure function of (seed, epoch, batch index), so a
resumed run sees exactly the batches an uninterrupted run would; evaluation randomness is
fixed by the seed, so validation and test numbers are reproducible.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Iterator
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tensorflow as tf

from experiments.training import parallel

PyTree = Any
"""A JAX pytree (nested dicts, lists, tuples and dataclasses of arrays)."""

Picture = Callable[[PyTree, jax.Array], np.ndarray]
"""(params, rng) → an RGB(A) or grey picture (H, W, C) with values in [0, 1]."""

TRAIN_NOISE, VALIDATION_NOISE, TEST_NOISE = 0, 1, 2
"""Independent randomness streams for the three splits."""


class DatasetNotFoundError(FileNotFoundError):
  """The dataset is not where the config says, and the config gives no way to get it."""


@dataclasses.dataclass(frozen=True)
class Splits:
  """The three splits of flat raw records (D,), and their sizes.

  Validation and test are cached datasets. The training split is one too, or, for a source
  that holds its data in memory, the array itself (N, D): its epochs are then drawn by
  indexing with a permutation, where tf.data's element-wise shuffle would take seconds per
  epoch for millions of records.
  """

  train: tf.data.Dataset | np.ndarray
  validation: tf.data.Dataset
  test: tf.data.Dataset
  num_train: int
  num_features: int


class DataSource(abc.ABC):
  """A dataset as the training loop sees it."""

  splits: Splits
  picture_name: str = "samples"  # The picture is written to <workdir>/<picture_name>.png.

  @abc.abstractmethod
  def preprocess(self, raw: jax.Array, key: jax.Array, training: bool) -> jax.Array:
    """Raw records (B, D) → float32 model inputs y (B, D); jit-able, randomness from `key`."""

  def extra_metrics(self, log_prob: jax.Array, y: jax.Array) -> dict[str, jax.Array]:
    """Per-example metrics (N,) besides the log-likelihood log p(y) (N,); none by default."""
    del log_prob, y
    return {}

  def make_picture(self, model: Any) -> Picture | None:
    """The picture drawn at each evaluation from the model's params, or None for none."""
    del model
    return None


class ArraySource(DataSource):
  """Real-valued records modelled as they are: y = the record as float32."""

  def preprocess(self, raw: jax.Array, key: jax.Array, training: bool) -> jax.Array:
    del key, training
    return raw.astype(jnp.float32)


def count(dataset: tf.data.Dataset) -> int:
  """Number of elements of a finite dataset."""
  cardinality = int(dataset.cardinality())
  if cardinality >= 0:
    return cardinality
  return int(dataset.reduce(0, lambda total, _: total + 1))


def arrays_to_splits(train: np.ndarray, validation: np.ndarray, test: np.ndarray) -> Splits:
  """Splits from in-memory arrays (N_split, D): uint8 kept, anything else stored as float32."""
  stored = lambda array: array if array.dtype == np.uint8 else np.asarray(array, np.float32)
  as_dataset = lambda array: tf.data.Dataset.from_tensor_slices(stored(array)).cache()
  return Splits(
    stored(train),
    as_dataset(validation),
    as_dataset(test),
    num_train=train.shape[0],
    num_features=train.shape[1],
  )


def noise_key(seed: int | jax.Array, *counters: int | jax.Array) -> jax.Array:
  """A PRNG key that is a pure function of (seed, counters...): jit-able, traced counters ok."""
  key = jax.random.PRNGKey(seed)
  for counter in counters:
    key = jax.random.fold_in(key, counter)
  return key


def train_chunks(
  splits: Splits,
  config: ml_collections.ConfigDict,
  epoch: int,
  skip_batches: int = 0,
  rows: slice = slice(None),
) -> Iterator[dict[str, np.ndarray]]:
  """One epoch of shuffled raw training batches, `steps_per_call` batches per element.

  Each element is {"examples": (k, b, D) raw dtype, "batch_index": int32 (k,)} with k ≤
  steps_per_call (the epoch's last chunk may be shorter) and b the number of `rows` of each
  global batch of `config.batch_size` that this host feeds (all by default); the remainder of
  the epoch that does not fill a batch is dropped. The order depends only on
  (config.seed, epoch), the same on every host; `skip_batches` skips the epoch's first
  batches (for resuming).
  """
  seed = int(np.random.SeedSequence([config.seed, epoch]).generate_state(1)[0])
  if isinstance(splits.train, np.ndarray):
    return _array_chunks(
      splits.train, config.batch_size, config.steps_per_call, seed, skip_batches, rows
    )
  dataset = splits.train.shuffle(splits.num_train, seed=seed, reshuffle_each_iteration=False)
  dataset = dataset.batch(config.batch_size, drop_remainder=True).enumerate().skip(skip_batches)
  dataset = dataset.map(
    lambda index, examples: {
      "examples": examples[rows],
      "batch_index": tf.cast(index, tf.int32),
    }
  )
  return dataset.batch(config.steps_per_call).prefetch(tf.data.AUTOTUNE).as_numpy_iterator()


def _array_chunks(
  records: np.ndarray,
  batch_size: int,
  steps_per_call: int,
  seed: int,
  skip_batches: int,
  rows: slice,
) -> Iterator[dict[str, np.ndarray]]:
  """`train_chunks` for records (N, D) in memory: batches are rows of a seeded permutation."""
  num_batches = records.shape[0] // batch_size
  order = np.random.default_rng(seed).permutation(records.shape[0])[: num_batches * batch_size]
  order = order.reshape(num_batches, batch_size)[:, rows]
  for start in range(skip_batches, num_batches, steps_per_call):
    indices = order[start : start + steps_per_call]
    yield {
      "examples": records[indices],
      "batch_index": np.arange(start, start + indices.shape[0], dtype=np.int32),
    }


def eval_array(
  source: DataSource, dataset: tf.data.Dataset, seed: int, noise_stream: int
) -> jax.Array:
  """A whole evaluation split as y (N, D) on the device, preprocessed with fixed seeded noise."""
  preprocess = jax.jit(lambda raw, key: source.preprocess(raw, key, training=False))
  chunks = [
    preprocess(raw, noise_key(seed, noise_stream, index))
    for index, raw in enumerate(dataset.batch(1000).as_numpy_iterator())
  ]
  return jnp.concatenate(chunks, axis=0)


def prefetch_to_device(
  batches: Iterable[Any], put: Callable[[Any], Any] = jax.device_put, size: int = 2
) -> Iterator[Any]:
  """Yields `put(element)` (a transfer to the devices), `size` elements ahead of the consumer."""
  queue = []
  for batch in batches:
    queue.append(put(batch))
    if len(queue) > size:
      yield queue.pop(0)
  yield from queue


def device_chunks(
  splits: Splits,
  config: ml_collections.ConfigDict,
  epoch: int,
  data_parallel: parallel.DataParallel,
  skip_batches: int = 0,
) -> Iterator[dict[str, jax.Array]]:
  """One epoch of training chunks (`train_chunks`) as global arrays on the devices.

  This host reads only its rows of each global batch; the chunks are assembled over the
  `data` mesh (`DataParallel.put_chunk`) two ahead of the consumer.
  """
  local_chunks = train_chunks(
    splits, config, epoch, skip_batches, data_parallel.local_rows(config.batch_size)
  )
  return prefetch_to_device(
    local_chunks, lambda chunk: data_parallel.put_chunk(chunk, config.batch_size)
  )


def load_source(config: ml_collections.ConfigDict) -> DataSource:
  """The data source named by `config.data_source` ("images", "toy" or "tabular")."""
  # Imported here: the sources import this module, and each pulls in only what its data needs
  # (tfds, matplotlib, ...).
  # pylint: disable=g-import-not-at-top
  if config.data_source == "images":
    from experiments import images

    return images.ImageSource(config)
  if config.data_source == "toy":
    from experiments.toy import input_pipeline as toy

    return toy.ToySource(config)
  if config.data_source == "tabular":
    from experiments.tabular import input_pipeline as tabular

    return tabular.TabularSource(config)
  raise ValueError(
    f"config.data_source={config.data_source!r} is not one of ['images', 'tabular', 'toy']."
  )
