"""Every shipped config file passes the checks, and one config of each model and training step
builds its run and trains a few steps (mock or synthetic data)."""

import glob
import importlib
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from experiments.training import config as config_lib
from experiments.training import data
from experiments.training import evaluation
from experiments.training import loop

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
# test_mnist.py runs the MNIST default end to end, through test.py (the default, smaller).
RUN_END_TO_END_ELSEWHERE = {"experiments.mnist.configs.default", "experiments.mnist.configs.test"}
CONFIG_MODULES = sorted(
  module
  for module in (
    os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
    for path in glob.glob(os.path.join(ROOT, "experiments", "*", "configs", "*.py"))
  )
  if not module.endswith("__init__") and module not in RUN_END_TO_END_ELSEWHERE
)
STRUCTURE_FIELDS = (
  "data_source",
  "dataset",
  "num_layers",
  "use_bias",
  "kernel_init",
  "lr_schedule",
  "on_divergence",
)
"""The fields that shape a run's model and training step; `structure` adds whether splines and
clipping are on. Configs that differ only elsewhere (run lengths, learning rates, bins) train
the same program: one of each structure trains, the others are validated."""


def structure(config) -> tuple:
  return (
    *(config[field] for field in STRUCTURE_FIELDS),
    config.spline_bins > 0,
    config.clip_norm > 0,
  )


def first_of_each_structure(modules) -> list[str]:
  seen, firsts = set(), []
  for module in modules:
    key = structure(importlib.import_module(module).get_config())
    if key not in seen:
      seen.add(key)
      firsts.append(module)
  return firsts


TRAINED_MODULES = first_of_each_structure(CONFIG_MODULES)


def small(config, maf_release_dir):
  """The config with data and run lengths cut to a few steps (the model and optimiser kept)."""
  config.update(
    batch_size=4,
    steps_per_call=2,
    num_epochs=1,
    eval_batch_size=8,
    warmup_steps=min(config.warmup_steps, 2),
  )
  if config.data_source == "images":
    config.update(download=True, num_samples=4)
  elif config.data_source == "toy":
    config.update(num_train=16, num_validation=8, num_test=8)
  else:
    config.data_dir = maf_release_dir
  return config


def test_every_experiment_has_configs():
  assert {
    "experiments.mnist.configs.dense2_best",
    "experiments.cifar10.configs.default",
    "experiments.toy.configs.default",
    "experiments.tabular.configs.default",
  } <= set(CONFIG_MODULES)


@pytest.mark.parametrize("module", CONFIG_MODULES)
def test_shipped_config_is_valid(module, maf_release_dir):
  """Every config passes the programs' checks, as shipped and cut to a few steps."""
  config = importlib.import_module(module).get_config()
  config_lib.validate_config(config)
  config_lib.validate_config(small(config, maf_release_dir))


@pytest.mark.parametrize("module", TRAINED_MODULES)
def test_shipped_config_builds_and_trains_a_few_steps(module, maf_release_dir, tmp_path):
  config = small(importlib.import_module(module).get_config(), maf_release_dir)
  config_lib.validate_config(config)
  with tfds.testing.mock_data(num_examples=16):
    run = loop.Run(config, str(tmp_path), data.load_source(config))
    chunk = next(data.device_chunks(run.splits, config, 0, run.parallel))
    validation_y = run.validation_y()
  state = run.train_chunk(run.make_initial_state(), chunk, 0)
  assert int(state.step) == 2 and np.isfinite(float(state.loss_sum))
  metrics = evaluation.evaluate(run.eval_step, state.params, validation_y, config.eval_batch_size)
  diagnostics = evaluation.kernel_diagnostics(state.params)
  assert len(diagnostics) == 2 * config.num_layers and all(
    np.isfinite(v) for v in diagnostics.values()
  )
  assert np.isfinite(metrics["ll"])  # Pictures: drawn in the end-to-end tests of each source.
