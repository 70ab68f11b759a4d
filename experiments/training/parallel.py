"""Data parallelism with JAX's SPMD machinery: a 1-D `data` mesh over every device of every host.

The global batch (of training and of evaluation) is sharded along `data`; parameters and
optimizer state are replicated. The
jitted train step is written for the global arrays, so the relative gradient's reductions
over the batch (ũᵀ δ̃, Σ δ) become all-reduces that XLA inserts. Each host feeds only its own
rows of every global batch (`local_rows`), and `put_chunk` assembles the global array from
the per-host pieces. Several hosts: set `config.coordinator_address`, `num_processes` and
`process_id`, and `initialize_distributed` calls `jax.distributed.initialize`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from jax.sharding import AxisType
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec
import ml_collections
import numpy as np

PyTree = Any


DATA_AXIS = "data"


def initialize_distributed(config: ml_collections.ConfigDict) -> None:
  """Joins a multi-process run when `config.coordinator_address` is set (else does nothing)."""
  if not config.coordinator_address:
    return
  # Cross-process collectives on CPU need gloo; accelerators use their own collectives.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
    coordinator_address=config.coordinator_address,
    num_processes=config.num_processes,
    process_id=config.process_id,
  )


@dataclasses.dataclass(frozen=True)
class DataParallel:
  """Shardings of one run over `mesh` (1-D, axis `data`)."""

  mesh: Mesh

  @classmethod
  def over_all_devices(cls) -> DataParallel:
    return cls(Mesh(np.array(jax.devices()), (DATA_AXIS,), axis_types=(AxisType.Auto,)))

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, PartitionSpec())

  @property
  def chunk_sharding(self) -> dict[str, NamedSharding]:
    """Train chunks {"examples": (k, B, D) sharded along B, "batch_index": (k,) replicated}."""
    return {
      "examples": NamedSharding(self.mesh, PartitionSpec(None, DATA_AXIS, None)),
      "batch_index": self.replicated,
    }

  def local_rows(self, batch_size: int) -> slice:
    """The rows of every global batch that this host feeds (all of them on one host)."""
    if batch_size % self.mesh.size:
      raise ValueError(
        f"config.batch_size={batch_size} must be divisible by the number of devices "
        f"({self.mesh.size}) to shard the batch over them."
      )
    per_process = batch_size // jax.process_count()
    return slice(jax.process_index() * per_process, (jax.process_index() + 1) * per_process)

  def put_chunk(self, local_chunk: dict[str, np.ndarray], batch_size: int) -> dict[str, jax.Array]:
    """Global chunk arrays from this host's rows (examples (k, B/P, D) → (k, B, D))."""
    examples = local_chunk["examples"]
    global_shape = (examples.shape[0], batch_size, examples.shape[2])
    return {
      "examples": jax.make_array_from_process_local_data(
        self.chunk_sharding["examples"], examples, global_shape
      ),
      "batch_index": jax.make_array_from_process_local_data(
        self.replicated, local_chunk["batch_index"]
      ),
    }

  def put_batch(self, batch: np.ndarray) -> jax.Array:
    """A host batch (N, D), the same on every host, sharded along N over the mesh (replicated
    when N is not divisible by the device count, as an evaluation set's last batch may be)."""
    spec = (
      PartitionSpec(DATA_AXIS, None) if batch.shape[0] % self.mesh.size == 0 else PartitionSpec()
    )
    return jax.device_put(batch, NamedSharding(self.mesh, spec))

  def abstract_replicated(self, abstract_tree: PyTree) -> PyTree:
    """ShapeDtypeStructs of a replicated tree: targets for restoring checkpoints."""
    return jax.tree_util.tree_map(
      lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=self.replicated),
      abstract_tree,
    )
