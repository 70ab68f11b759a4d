"""Orbax checkpoints of a training run: the latest state (resume) and the best parameters.

Both live under `<workdir>/checkpoints/` and are written atomically by Orbax (a crash leaves
the previous checkpoint intact). `<workdir>/config.json` records the config that made them,
so a later run with another model or dataset is refused instead of silently mixing states.
Unreadable states that a resumed run skipped are kept in `<workdir>/checkpoints/unreadable/`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
import contextlib
import json
import os
from typing import Any

from absl import logging
import jax
import ml_collections
import orbax.checkpoint as ocp

PyTree = Any


UNREADABLE_DIR = "unreadable"
"""Where, under `<workdir>/checkpoints/`, skipped unreadable states go (outside Orbax's folders)."""

MODEL_FIELDS = (
  "data_source",
  "dataset",
  "image_shape",
  "num_layers",
  "alpha",
  "use_bias",
  "lam",
  "spline_bins",
  "spline_bound",
)
"""Config fields that must match for checkpoints to be reusable (compared where both configs have them)."""

DATA_FIELDS = (
  "seed",
  "num_train",
  "num_validation",
  "num_test",
  "train_split",
  "validation_split",
  "test_split",
)
"""Config fields that define a run's data: the toy sets' draws, the splits, the noise (the seed).
Evaluating a checkpoint on other data, or resuming with it, would report another run's numbers."""

RESUME_FIELDS = MODEL_FIELDS + DATA_FIELDS + ("batch_size",)
"""What a resumed run must keep: also the batch size, which maps steps to epochs and batches.
(The learning rate, its schedule and `num_epochs` may change: a lower rate after a divergence,
more epochs after a finished run.)"""

EVALUATION_FIELDS = MODEL_FIELDS + DATA_FIELDS
"""What evaluating a workdir's checkpoint must keep."""


class RunCheckpoints:
  """`latest` keeps the last two full train states; `best` keeps the best-by-validation params."""

  def __init__(self, workdir: str):
    root = os.path.join(os.path.abspath(workdir), "checkpoints")  # Orbax needs absolute paths.
    # Across processes, two managers finalising asynchronous saves at once collide on Orbax's
    # barrier names; there, save synchronously.
    options = lambda keep: ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=True, enable_async_checkpointing=jax.process_count() == 1
    )
    self.latest = ocp.CheckpointManager(os.path.join(root, "latest"), options=options(2))
    self.best = ocp.CheckpointManager(
      os.path.join(root, "best"), options=options(1), item_handlers=ocp.StandardCheckpointHandler()
    )

  def save_latest(self, step: int, state: PyTree) -> None:
    self.latest.save(step, args=ocp.args.StandardSave(state))

  def save_best(self, step: int, params: PyTree, validation_ll: float) -> None:
    self.best.save(
      step, args=ocp.args.StandardSave({"params": params}), metrics={"validation_ll": validation_ll}
    )

  def restore_latest(
    self, abstract_state: PyTree, at_most_step: int | None = None
  ) -> PyTree | None:
    """The newest readable train state (with step ≤ at_most_step if given), or None if none is saved.

    An unreadable checkpoint (corrupt files) is skipped with a warning that names its step; once
    an older one is read, the unreadable newer ones are moved to `<checkpoints>/unreadable/`
    (out of the way of the resumed run, which saves those steps again, but kept for whoever
    wants to inspect them) and a warning says where. ValueError if every candidate is
    unreadable (then nothing is moved).
    """
    steps = sorted(
      (step for step in self.latest.all_steps() if at_most_step is None or step <= at_most_step),
      reverse=True,
    )
    unreadable = []
    for step in steps:
      try:
        state = _restore(self.latest, abstract_state, step)
      except ValueError as error:
        logging.warning("%s Trying the next older checkpoint.", error)
        unreadable.append(step)
        continue
      if unreadable:
        moved = self._move_aside(unreadable)
        logging.warning(
          "Resuming from step %d; moved the unreadable checkpoints of steps %s to %s.",
          step,
          unreadable,
          ", ".join(moved),
        )
      return state
    if unreadable:
      raise ValueError(
        f"None of the checkpoints in {self.latest.directory} (steps {unreadable}) can be restored; "
        "see the warnings above for each. They are corrupt or were written by another model or "
        "optimiser; delete them or use a fresh --workdir."
      )
    return None

  def _move_aside(self, steps: list[int]) -> list[str]:
    """Moves the step folders of `latest` to `<checkpoints>/unreadable/<step>` (`<step>.1`, ... if
    that is taken) and returns the new paths.

    A rename, not Orbax's delete: nothing a user might want to inspect is lost. Process 0 moves
    them (the folders are shared); every process then reloads its manager's list of steps,
    without which Orbax would skip saving those steps again (it saves no step ≤ its latest).
    """
    latest = os.fspath(self.latest.directory)
    unreadable = os.path.join(os.path.dirname(latest), UNREADABLE_DIR)
    moved = []
    for step in steps:
      # The manager's default step names: the step number.
      source, target = os.path.join(latest, str(step)), os.path.join(unreadable, str(step))
      suffix = 0
      while os.path.exists(target):
        suffix += 1
        target = os.path.join(unreadable, f"{step}.{suffix}")
      if jax.process_index() == 0:
        os.makedirs(unreadable, exist_ok=True)
        os.rename(source, target)
      moved.append(target)
    ocp.multihost.sync_global_processes("RunCheckpoints:moved_unreadable_steps")
    self.latest.reload()
    return moved

  def discard_after(self, step: int) -> None:
    """Deletes the saved train states and best params newer than `step` (they come from a
    diverged run)."""
    for manager in (self.latest, self.best):
      for saved_step in manager.all_steps():
        if saved_step > step:
          manager.delete(saved_step)

  def best_params_shapes(self) -> tuple[int, PyTree]:
    """(step, the best params' shapes as a tree of tuples), read from the checkpoint's metadata."""
    step = self.best.latest_step()
    if step is None:
      raise FileNotFoundError(
        f"No best checkpoint in {self.best.directory}; train first with this --workdir."
      )
    metadata = self.best.item_metadata(step)["params"]
    return step, jax.tree_util.tree_map(lambda leaf: tuple(leaf.shape), metadata)

  def restore_best_params(self, abstract_params: PyTree) -> tuple[int, PyTree]:
    """(step, params) of the best checkpoint."""
    if self.best.latest_step() is None:
      raise FileNotFoundError(
        f"No best checkpoint in {self.best.directory}; train first with this --workdir."
      )
    step = self.best.latest_step()
    return step, _restore(self.best, {"params": abstract_params}, step)["params"]

  def wait_until_finished(self) -> None:
    self.latest.wait_until_finished()
    self.best.wait_until_finished()

  def close(self) -> None:
    """Waits for in-flight (atomic) saves and releases the managers' resources."""
    self.latest.close()
    self.best.close()


class _FinishingEventLoop(asyncio.SelectorEventLoop):
  """An event loop that lets its unfinished tasks finish (or fail) before it closes."""

  def close(self) -> None:
    unfinished = asyncio.all_tasks(self)
    if unfinished and not self.is_running() and not self.is_closed():
      self.run_until_complete(asyncio.gather(*unfinished, return_exceptions=True))
    super().close()


class _FinishingEventLoopPolicy(asyncio.DefaultEventLoopPolicy):
  def new_event_loop(self) -> asyncio.AbstractEventLoop:
    return _FinishingEventLoop()


@contextlib.contextmanager
def _reads_finish_before_their_event_loop_closes() -> Iterator[None]:
  """New event loops of the body finish their tasks before closing.

  Orbax runs each restore in a new event loop and closes it as soon as the restore returns or
  raises (`orbax.checkpoint._src.asyncio_utils.run_sync`, which avoids `asyncio.run`). The reads
  of a checkpoint's arrays run concurrently: when one fails (a corrupt file), the others are
  still in flight, and tensorstore later delivers their results to the closed loop. Python then
  reports "RuntimeError: Event loop is closed", "coroutine ... was never awaited" and
  "Task exception was never retrieved" as unraisable exceptions and log lines, long after the
  restore and far from it (in whatever runs next: another test, interpreter shutdown). Waiting
  for those reads costs at most the rest of one checkpoint's reading.

  The event loop policy is the one hook that asyncio offers (deprecated from Python 3.14, which
  the experiments do not support yet).
  """
  previous = asyncio.get_event_loop_policy()
  asyncio.set_event_loop_policy(_FinishingEventLoopPolicy())
  try:
    yield
  finally:
    asyncio.set_event_loop_policy(previous)


def _restore(manager: ocp.CheckpointManager, abstract: PyTree, step: int) -> PyTree:
  """The checkpoint of `step`, or ValueError saying that it cannot be read and why."""
  try:
    with _reads_finish_before_their_event_loop_closes():
      return manager.restore(step, args=ocp.args.StandardRestore(abstract))
  except Exception as error:  # Orbax raises several types for unreadable or mismatched data.
    raise ValueError(
      f"Cannot restore the checkpoint at step {step} in {manager.directory} "
      f"({type(error).__name__}: {str(error)[:300]}). It is corrupt or was written by "
      "another model; delete it or use a fresh --workdir."
    ) from error


def check_config(
  config: ml_collections.ConfigDict, workdir: str, fields: tuple[str, ...] = RESUME_FIELDS
) -> None:
  """Refuses a config that differs from the workdir's config.json in `fields` (nothing to check
  without one); every process checks."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return
  current = json.loads(config.to_json())
  with open(path) as file:
    saved = json.load(file)
  changed = {
    k: (saved[k], current[k])
    for k in fields
    if k in saved and k in current and saved[k] != current[k]
  }
  # A config.json from before spline_placement existed had a spline before every layer;
  # without bins there is nothing to place.
  placement = lambda c: c.get("spline_placement", "every_layer") if c.get("spline_bins") else None
  if placement(saved) != placement(current):
    changed["spline_placement"] = (placement(saved), placement(current))
  # Averaged params are part of the saved train state or not; their decay may change.
  uses_ema = lambda c: c.get("ema_decay", 0.0) > 0
  if uses_ema(saved) != uses_ema(current):
    changed["ema_decay"] = (saved.get("ema_decay", 0.0), current["ema_decay"])
  if changed:
    raise ValueError(
      f"{workdir} holds checkpoints of a different model or dataset ({changed}, as "
      "(saved, now)); use a fresh --workdir or the config it was trained with (its "
      "config.json)."
    )


def record_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes config.json (atomically; process 0), once the run's state was made or restored
  with this config: a command that fails before that leaves the record as it was."""
  if jax.process_index() != 0:
    return
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "config.json")
  temporary = path + ".tmp"
  with open(temporary, "w") as file:
    json.dump(json.loads(config.to_json()), file, indent=2)
  os.replace(temporary, path)
