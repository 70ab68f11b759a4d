"""Data-parallel training on a `data` mesh: 4 virtual devices, and 2 processes × 2 devices.

Each sharded run happens in a subprocess (XLA's device count is fixed at start-up); its final
parameters must equal a single-device run's on the same global batches.
"""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from experiments.mnist.configs import test as test_config
from experiments.training import checkpoints
from experiments.training import loop
from experiments.training import parallel
from experiments.training import steps

NUM_EXAMPLES = 16
WORKER = os.path.join(os.path.dirname(__file__), "parallel_worker.py")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parallel_config():
  config = test_config.get_config()
  config.update(download=True, batch_size=8, steps_per_call=2, checkpoint_every_steps=2)
  return config


def final_params(workdir):
  config = parallel_config()
  model, tx = steps.create_model(config), steps.create_optimizer(config, total_steps=1)
  abstract = steps.abstract_state(
    model, tx, 784, config.seed, parallel.DataParallel.over_all_devices()
  )
  state = checkpoints.RunCheckpoints(str(workdir)).restore_latest(abstract)
  assert int(state.step) == 2 * NUM_EXAMPLES // config.batch_size
  return jax.tree_util.tree_leaves(state.params)


@pytest.fixture(scope="module")
def single_device_params(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("single")
  with tfds.testing.mock_data(num_examples=NUM_EXAMPLES):
    loop.train_and_evaluate(parallel_config(), str(workdir))
  return final_params(workdir)


def launch(workdir, num_devices, *distributed):
  return subprocess.Popen(
    [sys.executable, WORKER, str(workdir), str(num_devices), *map(str, distributed)],
    cwd=ROOT,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    env={**os.environ, "PYTHONPATH": ROOT},
  )


def report(process):
  stdout, stderr = process.communicate(timeout=240)
  assert process.returncode == 0, stderr[-3000:]
  return json.loads(stdout.strip().splitlines()[-1])


def assert_same_params(workdir, expected):
  for actual, reference in zip(final_params(workdir), expected, strict=True):
    np.testing.assert_allclose(actual, reference, rtol=0, atol=1e-5)


def test_four_devices_shard_the_batch_and_match_one_device(tmp_path, single_device_params):
  result = report(launch(tmp_path, 4))
  assert result["devices"] == 4 and result["processes"] == 1
  assert result["chunk_spec"] == "P(None, 'data', None)"
  assert result["chunk_shape"] == [2, 8, 784] and result["shard_shape"] == [2, 2, 784]
  assert result["eval_spec"] == "P('data', None)"
  assert_same_params(tmp_path, single_device_params)


def test_two_processes_with_two_devices_each_match_one_device(tmp_path, single_device_params):
  with socket.socket() as probe:
    probe.bind(("localhost", 0))
    coordinator = f"localhost:{probe.getsockname()[1]}"
  workers = [launch(tmp_path, 2, coordinator, 2, process_id) for process_id in range(2)]
  results = [report(worker) for worker in workers]
  for result in results:
    assert result["devices"] == 4 and result["processes"] == 2
    assert result["chunk_shape"] == [2, 8, 784] and result["shard_shape"] == [2, 2, 784]
  assert_same_params(tmp_path, single_device_params)
