"""Does the input pipeline starve the train step? Bare step vs end-to-end, side by side.

`python -m experiments.mnist.throughput [--config.batch_size=100] [--steps=2000]` times, in
one process and alternating for `--repetitions` rounds, (a) the bare jitted train step
(`train.make_train_step`, one call per step) on a batch already on the device, and (b) the
training loop's chunked step (`train.make_train_chunk`) fed by the real tf.data pipeline
through `prefetch_to_device`, and prints the median examples/s of each and their ratio.
"""

import os
import statistics
import time

from absl import app
from absl import flags
import jax
from ml_collections import config_flags

from experiments.mnist import input_pipeline
from experiments.mnist import train

flags.DEFINE_integer("steps", 2000, "Train steps per timed round.")
flags.DEFINE_integer("repetitions", 3, "Alternating rounds of each measurement.")
config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(__file__), "configs", "default.py"), "Training configuration.",
    lock_config=True,
)
FLAGS = flags.FLAGS


def main(argv):
  del argv
  config = FLAGS.config
  splits = input_pipeline.load_splits(config)
  model = train.create_model(config)
  tx = train.create_optimizer(config, total_steps=FLAGS.steps * FLAGS.repetitions)
  train_step = jax.jit(train.make_train_step(model, tx), donate_argnums=0)
  train_chunk = train.make_train_chunk(model, tx, config)
  state = train.initial_state(model, tx, splits.num_features, config.seed)
  first_chunk = next(input_pipeline.prefetch_to_device(input_pipeline.train_chunks(splits, config, 0)))
  state = jax.block_until_ready(train_chunk(state, first_chunk, 0))  # Compile.
  key = input_pipeline.noise_key(config.seed, 0)
  fixed_batch = input_pipeline.dequantize_and_logit(first_chunk["images"][0], key, config.lam)
  state = jax.block_until_ready(train_step(state, fixed_batch))  # Compile.

  def bare(state):
    start = time.perf_counter()
    for _ in range(FLAGS.steps):
      state = train_step(state, fixed_batch)
    return jax.block_until_ready(state), time.perf_counter() - start

  def end_to_end(state, epoch):
    chunks = input_pipeline.prefetch_to_device(input_pipeline.train_chunks(splits, config, epoch))
    start, steps = time.perf_counter(), 0
    for chunk in chunks:
      state = train_chunk(state, chunk, epoch)
      steps += chunk["batch_index"].shape[0]
      if steps >= FLAGS.steps:
        break
    return jax.block_until_ready(state), time.perf_counter() - start, steps

  rates = {"bare step": [], "end to end": []}
  for repetition in range(FLAGS.repetitions):
    state, seconds = bare(state)
    rates["bare step"].append(FLAGS.steps * config.batch_size / seconds)
    state, seconds, steps = end_to_end(state, repetition)
    rates["end to end"].append(steps * config.batch_size / seconds)
  medians = {name: statistics.median(values) for name, values in rates.items()}
  for name, median in medians.items():
    print(f"{name:>10}: {median:9.0f} examples/s (median of {FLAGS.repetitions}; "
          f"all: {', '.join(f'{v:.0f}' for v in rates[name])})")
  print(f"end to end / bare step = {medians['end to end'] / medians['bare step']:.3f} "
        f"(batch {config.batch_size}, {config.num_layers} layers, D={splits.num_features}, "
        f"{jax.devices()[0].platform})")


if __name__ == "__main__":
  app.run(main)
