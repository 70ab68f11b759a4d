"""Image data: dequantisation, logit, bits/dim, flips, batch order, splits of real MNIST."""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from experiments import images
from experiments.mnist.configs import default
from experiments.training import data

MNIST_FILES = os.path.join(
  os.path.dirname(__file__), "..", "..", "..", "shared", "datasets", "mnist"
)
LAM = 1e-6


def test_dequantize_and_logit_range_and_inverse():
  pixels = jnp.arange(256, dtype=jnp.uint8).reshape(4, 64)
  y = images.dequantize_and_logit(pixels, jax.random.PRNGKey(0), LAM)
  assert y.shape == (4, 64) and y.dtype == jnp.float32
  bound = math.log((1 - LAM) / LAM)  # |logit(λ + (1−2λ)x)| for x ∈ [0, 1]
  assert float(jnp.max(jnp.abs(y))) <= bound + 1e-3
  x = images.logit_to_pixels(y, LAM)
  # x = (p + u)/256 with u ∈ [0, 1): the pixel is recovered by flooring.
  np.testing.assert_array_equal(
    np.floor(np.asarray(x) * 256 + 1e-3).astype(np.uint8), np.asarray(pixels)
  )
  noise = np.asarray(x) * 256 - np.asarray(pixels)
  assert noise.min() > -1e-3 and noise.max() < 1 + 1e-3 and 0.4 < noise.mean() < 0.6


def test_noise_is_a_pure_function_of_its_counters():
  pixels = jnp.zeros((2, 8), jnp.uint8)
  draw = lambda *counters: images.dequantize_and_logit(pixels, data.noise_key(0, *counters), LAM)
  np.testing.assert_array_equal(draw(0, 3, 5), draw(0, 3, 5))
  assert not np.allclose(draw(0, 3, 5), draw(0, 4, 5))  # Another epoch: fresh noise.
  assert not np.allclose(draw(1, 3, 5), draw(2, 3, 5))  # Validation vs test streams.


def test_bits_per_dim_matches_change_of_variables_by_autodiff(float64):
  """bpd from log p(y) equals −log₂ of p(x)/256^D with p(x) from the Jacobian of x ↦ y."""
  y = jax.random.normal(jax.random.PRNGKey(0), (3, 5)) * 4
  log_prob_y = jnp.array([-10.0, -3.0, 2.0])
  s = jax.nn.sigmoid(y)
  x = (s - LAM) / (1 - 2 * LAM)
  to_logit = lambda x: jnp.log(LAM + (1 - 2 * LAM) * x) - jnp.log1p(-(LAM + (1 - 2 * LAM) * x))
  log_dy_dx = jnp.log(jax.vmap(jax.vmap(jax.grad(to_logit)))(x)).sum(-1)
  expected = -(log_prob_y + log_dy_dx - 5 * math.log(256)) / (5 * math.log(2))
  np.testing.assert_allclose(images.bits_per_dim(log_prob_y, y, LAM), expected, rtol=1e-10)


def test_pixel_log_probs_importance_weighted_bound_reaches_the_exact_pixel_probability():
  """For log p(y) = Σ_i log N(y_i; c_i, σ_i²), the probability of pixels p is exact in closed
  form: P(p) = Π_i [Φ((y_i⁺ − c_i)/σ_i) − Φ((y_i⁻ − c_i)/σ_i)], y_i^∓ = logit(λ + (1−2λ)·(p_i or
  p_i + 1)/256), the Gaussian's mass on the pixel's interval of logit space. The
  importance-weighted bound over K draws of `pixel_log_probs` must reach log P(p) within its
  Monte Carlo error, and the single-draw bound must stay clearly below it (σ is a fraction of
  the interval, so the density is far from uniform across it)."""
  pixels = jnp.array([[130, 200], [17, 64]], jnp.uint8)
  to_logit = lambda x: jnp.log(LAM + (1 - 2 * LAM) * x) - jnp.log1p(-(LAM + (1 - 2 * LAM) * x))
  lower = to_logit(np.asarray(pixels, np.float64) / 256)
  upper = to_logit((np.asarray(pixels, np.float64) + 1) / 256)
  centre, scale = lower + 0.3 * (upper - lower), 0.3 * (upper - lower)
  exact = np.log(
    jax.scipy.stats.norm.cdf(upper, centre, scale) - jax.scipy.stats.norm.cdf(lower, centre, scale)
  ).sum(-1)
  draws = 100_000
  for image in range(2):  # each image has its own Gaussian
    log_prob = lambda y, image=image: jax.scipy.stats.norm.logpdf(
      y, centre[image], scale[image]
    ).sum(-1)
    values = np.asarray(
      images.pixel_log_probs(
        log_prob, pixels[image : image + 1], jax.random.PRNGKey(image), LAM, draws
      ),
      np.float64,
    )[0]
    weights = np.exp(values - exact[image])
    weighted = math.log(weights.mean()) + exact[image]
    monte_carlo_error = weights.std() / (math.sqrt(draws) * weights.mean())
    assert monte_carlo_error < 0.005  # measured 0.0024 nats (a missing term shifts it by > 1)
    assert abs(weighted - exact[image]) < 5 * monte_carlo_error
    assert exact[image] - values.mean() > 0.3  # The single-draw bound is far below (0.43).


def mock_splits(config):
  with tfds.testing.mock_data(num_examples=24):
    return images.load_splits(config)


@pytest.mark.parametrize("in_memory", [False, True], ids=["tfds", "array"])
def test_train_chunks_resume_gives_the_same_later_batches(in_memory):
  """Both streams (tf.data for tfds splits, numpy indexing for arrays) batch a seeded
  permutation of the records, resume mid-epoch, and reshuffle each epoch."""
  config = default.get_config()
  config.update(download=True, batch_size=4, steps_per_call=2)
  splits = mock_splits(config)
  if in_memory:
    records = np.concatenate(list(splits.train.batch(24).as_numpy_iterator()))
    splits = data.arrays_to_splits(records, records[:4], records[:4])
  full = list(data.train_chunks(splits, config, epoch=1))
  resumed = list(data.train_chunks(splits, config, epoch=1, skip_batches=3))
  assert [c["batch_index"].tolist() for c in full] == [[0, 1], [2, 3], [4, 5]]
  assert [c["batch_index"].tolist() for c in resumed] == [[3, 4], [5]]
  np.testing.assert_array_equal(full[1]["examples"][1], resumed[0]["examples"][0])
  assert full[0]["examples"].shape == (2, 4, 784) and full[0]["examples"].dtype == np.uint8
  epoch_records = np.concatenate([c["examples"].reshape(-1, 784) for c in full])
  assert len({record.tobytes() for record in epoch_records}) == 24  # Each record once.
  other_epoch = next(iter(data.train_chunks(splits, config, epoch=2)))
  assert not np.array_equal(other_epoch["examples"], full[0]["examples"])
  half = next(iter(data.train_chunks(splits, config, epoch=1, rows=slice(2, 4))))
  np.testing.assert_array_equal(half["examples"], full[0]["examples"][:, 2:4])


def test_random_horizontal_flip_mirrors_about_half_of_the_images():
  shape = (2, 3, 2)  # H, W, C
  batch = jnp.arange(64 * 12, dtype=jnp.int32).reshape(64, 12)
  flipped = np.asarray(images.random_horizontal_flip(batch, jax.random.PRNGKey(0), shape)).reshape(
    64, *shape
  )
  original = np.asarray(batch).reshape(64, *shape)
  mirrored = np.all(flipped == original[:, :, ::-1, :], axis=(1, 2, 3))
  assert np.all(mirrored | np.all(flipped == original, axis=(1, 2, 3)))
  assert 16 < mirrored.sum() < 48


@pytest.fixture(scope="module")
def real_mnist(tmp_path_factory):
  if not os.path.isdir(MNIST_FILES):
    pytest.skip(f"the original MNIST files are not at {MNIST_FILES}")
  config = default.get_config()
  config.data_dir = str(tmp_path_factory.mktemp("tfds"))
  config.manual_dir = MNIST_FILES
  return config, images.ImageSource(config)  # Prepares tfds offline from the IDX files.


def test_real_mnist_split_sizes_and_values(real_mnist):
  config, source = real_mnist
  splits = source.splits
  assert splits.num_train == 50_000 and splits.num_features == 784
  assert sum(1 for _ in splits.validation) == 10_000
  test_y = data.eval_array(source, splits.test, config.seed, data.TEST_NOISE)
  assert test_y.shape == (10_000, 784)
  np.testing.assert_array_equal(
    test_y, data.eval_array(source, splits.test, config.seed, data.TEST_NOISE)
  )
  # Σ 256·x = Σ pixels + Σ u: the sum of every pixel value of the 10 000 original MNIST test
  # images (264 923 200) plus N/2 ± a few sqrt(N/12) for N uniform noise draws.
  scaled = np.asarray(images.logit_to_pixels(test_y, config.lam), np.float64) * 256
  count = scaled.size
  assert abs(scaled.sum() - 264_923_200 - count / 2) < 5 * math.sqrt(count / 12)
