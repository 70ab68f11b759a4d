"""The input pipeline of the image programs, `experiments.mnist` and `experiments.cifar10`.

tfds datasets of uint8 images (MNIST, CIFAR-10, ...) as a `DataSource` (docs/method.md,
"Reporting units"), picked by `config.data_source = "images"`.

Pixels p ∈ {0..255} become x = (p + u)/256 with u ~ U[0, 1), then y = logit(λ + (1−2λ)x),
on the devices. With `config.flip_horizontal`, each training image is mirrored left–right
with probability 1/2 (evaluation images never are). Reported besides log p(y) (logit nats):
bits/dim of the pixels. The picture is a grid of model samples.
"""

from __future__ import annotations

from collections.abc import Callable
import math
import tempfile

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

import flax_relgrad as fr
from experiments.training import data


def _builder(config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
  try:
    builder = tfds.builder(config.dataset, data_dir=config.data_dir or None)
  except tfds.core.registered.DatasetNotFoundError as error:
    raise data.DatasetNotFoundError(
      f"tfds has no dataset named {config.dataset!r} (config.dataset); check the spelling."
    ) from error
  if builder.is_prepared():
    return builder
  if config.manual_dir or config.download:
    _prepare(builder, config.manual_dir or None)
  else:
    raise data.DatasetNotFoundError(
      f"Dataset {config.dataset!r} is not prepared in data_dir {builder.data_dir!r}. "
      "Either set --config.manual_dir to a folder holding the dataset's original files "
      "(for MNIST the four IDX .gz files, e.g. ../shared/datasets/mnist), or "
      "--config.download=True to let tfds download it, or --config.data_dir to where it "
      "is already prepared."
    )
  return builder


def _prepare(builder: tfds.core.DatasetBuilder, manual_dir: str | None) -> None:
  """Prepares the dataset from `manual_dir` (or by downloading), extracting into a fresh folder.

  tfds names an extracted file after the original file's name only, in one folder per
  data_dir, and reuses what it finds there ("Reusing extraction of ..."): datasets whose
  original files share names (MNIST-format datasets all have train-images-idx3-ubyte.gz, ...)
  would be prepared from the first one's files. A temporary folder per preparation, named
  after the dataset and version and deleted afterwards, rules that out.
  """
  extracted = builder.data_dir_root / "downloads" / "extracted"
  extracted.mkdir(parents=True, exist_ok=True)
  prefix = f"{builder.name}-{builder.version}-"
  with tempfile.TemporaryDirectory(prefix=prefix, dir=extracted) as extract_dir:
    builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir, extract_dir=extract_dir)
    )


def load_splits(config: ml_collections.ConfigDict) -> data.Splits:
  """Train/validation/test splits of `config.dataset` as flat uint8 records, checking the format."""
  builder = _builder(config)
  image_feature = builder.info.features["image"]
  image_shape = tuple(image_feature.shape)
  if image_shape != tuple(config.image_shape) or image_feature.dtype != tf.uint8:
    raise ValueError(
      f"Dataset {config.dataset!r} has {image_feature.dtype.name} images of shape "
      f"{image_shape}, but config.image_shape is {tuple(config.image_shape)} uint8; this "
      "program models uint8 images of the configured shape."
    )
  flat_images = lambda split: (
    builder.as_dataset(split=split).map(lambda example: tf.reshape(example["image"], [-1])).cache()
  )
  train = flat_images(config.train_split)
  return data.Splits(
    train=train,
    validation=flat_images(config.validation_split),
    test=flat_images(config.test_split),
    num_train=data.count(train),
    num_features=math.prod(image_shape),
  )


def dequantize_and_logit(images: jax.Array, key: jax.Array, lam: float) -> jax.Array:
  """uint8 images (B, ...) → y (B, D) float32 with y = logit(λ + (1−2λ)(p + u)/256)."""
  images = images.reshape(images.shape[0], -1)
  x = (images.astype(jnp.float32) + jax.random.uniform(key, images.shape)) / 256.0
  s = lam + (1.0 - 2.0 * lam) * x
  return jnp.log(s) - jnp.log1p(-s)


def random_horizontal_flip(
  images: jax.Array, key: jax.Array, image_shape: tuple[int, int, int]
) -> jax.Array:
  """Flat images (B, H·W·C) → the same with each image mirrored left–right with probability 1/2."""
  batch = images.reshape(images.shape[0], *image_shape)
  flip = jax.random.bernoulli(key, 0.5, (images.shape[0], 1, 1, 1))
  return jnp.where(flip, batch[:, :, ::-1, :], batch).reshape(images.shape)


def logit_to_pixels(y: jax.Array, lam: float) -> jax.Array:
  """Inverse of the logit transform: y → x ∈ [0, 1] (clipped), same shape."""
  return jnp.clip((jax.nn.sigmoid(y) - lam) / (1.0 - 2.0 * lam), 0.0, 1.0)


def bits_per_dim(log_prob_logit: jax.Array, y: jax.Array, lam: float) -> jax.Array:
  """Per-example bits/dim of the pixels from log p(y) in logit space (docs/method.md, "Reporting units").

  log p(pixels) = log p(y) + D·log(1−2λ) − Σ_i log(s_i(1−s_i)) − D·log 256, s = sigmoid(y).
  """
  num_features = y.shape[-1]
  log_jacobian = jax.nn.log_sigmoid(y) + jax.nn.log_sigmoid(-y)
  log_prob_pixels = (
    log_prob_logit
    + num_features * math.log1p(-2.0 * lam)
    - log_jacobian.sum(-1)
    - num_features * math.log(256.0)
  )
  return -log_prob_pixels / (num_features * math.log(2.0))


def pixel_log_probs(
  log_prob: Callable[[jax.Array], jax.Array],
  images: jax.Array,
  key: jax.Array,
  lam: float,
  num_draws: int,
) -> jax.Array:
  """log p_model(p + u) of uint8 images (N, ...) at `num_draws` noise draws each: (N, K) nats.

  For each image p (D pixels) and each of K draws u ~ U[0, 1)^D, the density of the
  dequantised pixels x = (p + u)/256 scaled to the integer grid (so that for pixels,
  log P(p) = log E_u[exp(value)]): log p(y) of the model's input y = logit(λ + (1−2λ)x),
  plus log|∂y/∂x| and −D·log 256 (`bits_per_dim`'s conversion). `log_prob` maps y (M, D) to
  log p(y) (M,).
  """
  flat = images.reshape(images.shape[0], -1)
  repeated = jnp.repeat(flat, num_draws, axis=0)
  y = dequantize_and_logit(repeated, key, lam)
  bits = bits_per_dim(log_prob(y), y, lam)
  return (-bits * flat.shape[1] * math.log(2.0)).reshape(flat.shape[0], num_draws)


def image_grid(images: np.ndarray) -> np.ndarray:
  """Tiles images (N, H, W, C) into one (rows·H, columns·W, C) grid, about square."""
  number, height, width, channels = images.shape
  columns = math.ceil(math.sqrt(number))
  rows = math.ceil(number / columns)
  padded = np.zeros((rows * columns, height, width, channels), images.dtype)
  padded[:number] = images
  grid = padded.reshape(rows, columns, height, width, channels).transpose(0, 2, 1, 3, 4)
  return grid.reshape(rows * height, columns * width, channels)


class ImageSource(data.DataSource):
  """uint8 images of `config.image_shape` from tfds `config.dataset`, in logit space (λ = config.lam)."""

  def __init__(self, config: ml_collections.ConfigDict, splits: data.Splits | None = None):
    """`splits`: flat uint8 records to use instead of loading tfds (e.g. synthetic, for benchmarks)."""
    if not 0.0 < config.lam < 0.5:
      raise ValueError(f"config.lam must lie in (0, 0.5), got {config.lam}.")
    if int(config.num_samples) < 1:
      raise ValueError(f"config.num_samples must be a positive integer, got {config.num_samples}.")
    self.lam = config.lam
    self.image_shape = tuple(config.image_shape)
    self.flip_horizontal = bool(config.flip_horizontal)
    self.num_samples = config.num_samples
    self.splits = load_splits(config) if splits is None else splits

  def preprocess(self, raw: jax.Array, key: jax.Array, training: bool) -> jax.Array:
    if training and self.flip_horizontal:
      # The noise keeps `key` itself, so enabling the flip leaves the dequantisation noise as is.
      raw = random_horizontal_flip(raw, jax.random.fold_in(key, 1), self.image_shape)
    return dequantize_and_logit(raw, key, self.lam)

  def extra_metrics(self, log_prob: jax.Array, y: jax.Array) -> dict[str, jax.Array]:
    return {"bpd": bits_per_dim(log_prob, y, self.lam)}

  def make_picture(self, model: fr.FlowMLP) -> data.Picture:
    """A grid of `config.num_samples` model samples: inverse flow, then inverse logit."""

    @jax.jit
    def sample(params, rng):
      y = model.apply({"params": params}, rng, self.num_samples, method=fr.FlowMLP.sample)
      pixels = jnp.nan_to_num(logit_to_pixels(y, self.lam), nan=0.0)
      return pixels.reshape(self.num_samples, *self.image_shape)

    return lambda params, rng: image_grid(np.asarray(sample(params, rng)))
