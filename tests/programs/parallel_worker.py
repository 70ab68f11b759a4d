"""Runs the training program on mock data in a fresh process with N virtual CPU devices.

    python tests/programs/parallel_worker.py WORKDIR NUM_DEVICES [COORDINATOR NUM_PROCESSES PROCESS_ID]

Prints one JSON line: the device and process counts and the shardings of a train chunk and
of an evaluation batch.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={sys.argv[2]}"
).strip()

# pylint: disable=wrong-import-position
import jax
import numpy as np
import tensorflow_datasets as tfds

sys.path.insert(0, os.path.dirname(__file__))
from experiments.training import loop
from experiments.training import parallel
from test_parallel import NUM_EXAMPLES  # pylint: disable=g-import-not-at-top
from test_parallel import parallel_config  # pylint: disable=g-import-not-at-top


def main():
  config = parallel_config()
  if len(sys.argv) > 3:
    config.update(
      coordinator_address=sys.argv[3], num_processes=int(sys.argv[4]), process_id=int(sys.argv[5])
    )
  parallel.initialize_distributed(config)
  data_parallel = parallel.DataParallel.over_all_devices()
  rows = data_parallel.local_rows(config.batch_size)
  local = {
    "examples": np.zeros((2, rows.stop - rows.start, 784), np.uint8),
    "batch_index": np.arange(2, dtype=np.int32),
  }
  chunk = data_parallel.put_chunk(local, config.batch_size)
  with tfds.testing.mock_data(num_examples=NUM_EXAMPLES):
    loop.train_and_evaluate(config, sys.argv[1])
  print(
    json.dumps(
      {
        "devices": jax.device_count(),
        "processes": jax.process_count(),
        "chunk_shape": list(chunk["examples"].shape),
        "chunk_spec": str(chunk["examples"].sharding.spec),
        "shard_shape": list(chunk["examples"].addressable_shards[0].data.shape),
        "eval_spec": str(data_parallel.put_batch(np.zeros((8, 784), np.float32)).sharding.spec),
      }
    )
  )


if __name__ == "__main__":
  main()
