"""Does the input pipeline starve the train step? Bare step vs end-to-end, side by side.

    python -m experiments.training.throughput [--config=experiments/mnist/configs/default.py]
        [--config.batch_size=100] [--steps=2000] [--synthetic_examples=10000]

times, in one process and alternating for `--repetitions` rounds, (a) the bare jitted train
step (`steps.make_train_step`, one call per step) on a batch already on the devices, and (b)
the training loop's chunked step (`steps.make_train_chunk`, which also preprocesses on the
devices) fed by the training input stream (`data.device_chunks`: tf.data for tfds datasets,
numpy indexing for in-memory ones), and prints the median
examples/s and milliseconds per step of each and their ratio. With `--synthetic_examples=N`
(images only), N random uint8 images of `config.image_shape` replace the dataset, so the
step time of e.g. CIFAR-10 (D = 3072) can be measured where the dataset is not prepared.
"""

import math
import os
import statistics
import time

from absl import app
from absl import flags
import jax
from ml_collections import config_flags
import numpy as np

from experiments import images
from experiments.training import data
from experiments.training import parallel
from experiments.training import steps

flags.DEFINE_integer("steps", 2000, "Train steps per timed round.")
flags.DEFINE_integer("repetitions", 3, "Alternating rounds of each measurement.")
flags.DEFINE_integer(
  "synthetic_examples", 0, "If > 0: that many random uint8 images replace the dataset."
)
config_flags.DEFINE_config_file(
  "config",
  os.path.join(os.path.dirname(__file__), "..", "mnist", "configs", "default.py"),
  "Training configuration.",
  lock_config=True,
)
FLAGS = flags.FLAGS


def load_source(config) -> data.DataSource:
  if not FLAGS.synthetic_examples:
    return data.load_source(config)
  if config.data_source != "images":
    raise app.UsageError(
      "--synthetic_examples needs an image config (config.data_source='images')."
    )
  rng = np.random.default_rng(config.seed)
  random_split = lambda: rng.integers(
    0, 256, (FLAGS.synthetic_examples, math.prod(config.image_shape)), np.uint8
  )
  return images.ImageSource(
    config, data.arrays_to_splits(random_split(), random_split(), random_split())
  )


def main(argv):
  del argv
  config = FLAGS.config
  source = load_source(config)
  model = steps.create_model(config)
  tx = steps.create_optimizer(config, total_steps=FLAGS.steps * FLAGS.repetitions)
  data_parallel = parallel.DataParallel.over_all_devices()
  train_step = jax.jit(steps.make_train_step(model, tx, config.ema_decay), donate_argnums=0)
  train_chunk = steps.make_train_chunk(
    model, tx, source, config.seed, data_parallel, config.ema_decay
  )
  chunks = lambda epoch: data.device_chunks(source.splits, config, epoch, data_parallel)
  state = steps.initial_state(
    model, tx, source.splits.num_features, config.seed, config.ema_decay > 0
  )
  first_chunk = next(chunks(0))
  state = jax.block_until_ready(train_chunk(state, first_chunk, 0))  # Compile.
  fixed_batch = source.preprocess(
    first_chunk["examples"][0], data.noise_key(config.seed, 0), training=True
  )
  state = jax.block_until_ready(train_step(state, fixed_batch))  # Compile.

  def bare(state):
    start = time.perf_counter()
    for _ in range(FLAGS.steps):
      state = train_step(state, fixed_batch)
    return jax.block_until_ready(state), time.perf_counter() - start, FLAGS.steps

  def end_to_end(state, epoch):
    start, num_steps = time.perf_counter(), 0
    while num_steps < FLAGS.steps:  # Several epochs when the dataset is small.
      for chunk in chunks(epoch):
        state = train_chunk(state, chunk, epoch)
        num_steps += chunk["batch_index"].shape[0]
        if num_steps >= FLAGS.steps:
          break
      epoch += 1
    return jax.block_until_ready(state), time.perf_counter() - start, num_steps

  rates = {"bare step": [], "end to end": []}
  for repetition in range(FLAGS.repetitions):
    state, seconds, num_steps = bare(state)
    rates["bare step"].append(num_steps * config.batch_size / seconds)
    state, seconds, num_steps = end_to_end(state, 1000 * repetition)
    rates["end to end"].append(num_steps * config.batch_size / seconds)
  medians = {name: statistics.median(values) for name, values in rates.items()}
  for name, median in medians.items():
    print(
      f"{name:>10}: {median:9.0f} examples/s, {1000 * config.batch_size / median:8.2f} ms/step "
      f"(median of {FLAGS.repetitions}; all: {', '.join(f'{v:.0f}' for v in rates[name])})"
    )
  print(
    f"end to end / bare step = {medians['end to end'] / medians['bare step']:.3f} "
    f"(batch {config.batch_size}, {config.num_layers} layers, D={source.splits.num_features}, "
    f"{jax.devices()[0].platform})"
  )


if __name__ == "__main__":
  app.run(main)
