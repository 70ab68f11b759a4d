"""`load_run(workdir)`: a finished (or running) experiment's model and best parameters, e.g. in a notebook.

from experiments.training.runs import load_run
run = load_run("runs/mnist")          # settings from config.json, params from checkpoints/best
log_p = run.model.apply({"params": run.params}, y, method="log_prob")
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

import flax_relgrad as fr
from experiments.training import checkpoints
from experiments.training import parallel
from experiments.training import steps

PyTree = Any


@dataclasses.dataclass(frozen=True)
class TrainedRun:
  """A run's model (built from its config), best-by-validation parameters and their step."""

  model: fr.FlowMLP
  params: PyTree
  config: ml_collections.ConfigDict
  step: int


def load_run(workdir: str) -> TrainedRun:
  """The model of `<workdir>/config.json` and the parameters of `<workdir>/checkpoints/best`.

  Raises:
    FileNotFoundError: if the workdir has no config.json or no best checkpoint yet.
  """
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(
      f"{path} does not exist: {workdir} is not the --workdir of a training run."
    )
  with open(path) as file:
    config = ml_collections.ConfigDict(json.load(file))
  model = steps.create_model(config)
  run_checkpoints = checkpoints.RunCheckpoints(os.path.abspath(workdir))
  try:
    _, shapes = run_checkpoints.best_params_shapes()
    width = shapes["layers_0"]["kernel"][-1]
    abstract_params = jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, width)))
    )["params"]
    replicated = parallel.DataParallel.over_all_devices().abstract_replicated(abstract_params)
    step, params = run_checkpoints.restore_best_params(replicated)
  finally:
    run_checkpoints.close()
  return TrainedRun(model, params, config, step)
