"""Time one jitted training step (gradient + Adam update) of each benchmark method against D.

The methods are the five flows of `models` (`models.METHODS`). Each step is compiled
once per (method, B, D) with the params and optimizer state donated; the compile and a first
warm-up call are excluded from the timings. Methods are interleaved within the process: every
repetition runs each method once, for as many steps back to back as fill `min_repetition_s` by
the warm-up time (at least one), in an order that rotates with the repetition, so that machine
noise hits all methods alike.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import math
import os
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from experiments.scaling import models

PyTree = Any


@dataclasses.dataclass(frozen=True)
class BenchmarkConfig:
  """What to measure.

  Attributes:
    widths: the grid of D, measured in increasing order.
    batch_sizes: the grid of B.
    num_layers: L, dense layers per flow.
    spline_bins: K, bins of each spline of the ``splines`` method.
    alpha: slope α of SmoothLeakyReLU(α).
    learning_rate: Adam's learning rate.
    repetitions: interleaved repetitions per point; the report gives medians over them.
    min_repetition_s: one repetition of a method runs ⌈min_repetition_s / warm-up time⌉ ≥ 1
      steps back to back and records their mean time per step.
    time_cap_s: a method whose step is predicted (from its previous D and
      `models.COST_EXPONENT`) or measured on its warm-up call to exceed this is skipped at this
      and all larger D.
    fit_min_width: the exponent k of time ∝ D^k is fitted over points with D ≥ this.
    seed: seed of the data and the initial parameters.
  """

  widths: tuple[int, ...] = (64, 128, 256, 512, 784, 1024, 2048, 4096)
  batch_sizes: tuple[int, ...] = (10, 100)
  num_layers: int = 2
  spline_bins: int = 8
  alpha: float = 0.01
  learning_rate: float = 1e-4
  repetitions: int = 7
  min_repetition_s: float = 0.1
  time_cap_s: float = 5.0
  fit_min_width: int = 512
  seed: int = 0


@dataclasses.dataclass(frozen=True)
class Measurement:
  """Seconds per step of one method at one (B, D); `times_s` is empty when skipped.

  `params_finite` and `params_changed` check, after the timed steps, that the step trained:
  every parameter is finite and every parameter array moved away from its initial value.
  """

  method: str
  batch: int
  width: int
  times_s: tuple[float, ...]
  memory_bytes: int | None
  params_finite: bool = False
  params_changed: bool = False
  skip_reason: str = ""

  @property
  def skipped(self) -> bool:
    return not self.times_s

  @property
  def median_s(self) -> float:
    return statistics.median(self.times_s) if self.times_s else math.nan

  def quantile_s(self, q: float) -> float:
    return float(np.quantile(self.times_s, q)) if self.times_s else math.nan


@dataclasses.dataclass
class _Runner:
  """A compiled, donated step of one method at one point, with its live params and state."""

  compiled: Any
  initial_params: PyTree
  params: PyTree
  opt_state: PyTree
  x: jax.Array

  def step(self) -> jax.Array:
    """One training step on x, params and optimizer state updated in place; returns the loss."""
    self.params, self.opt_state, loss = self.compiled(self.params, self.opt_state, self.x)
    return loss

  def params_health(self) -> tuple[bool, bool]:
    """(all params finite, every param array differs from its initial value somewhere)."""
    params = jax.tree_util.tree_leaves(jax.device_get(self.params))
    initial = jax.tree_util.tree_leaves(self.initial_params)
    finite = all(np.isfinite(leaf).all() for leaf in params)
    return finite, all(np.any(a != b) for a, b in zip(params, initial, strict=True))


def compiled_memory_bytes(compiled: Any) -> int | None:
  """argument + output + temp − alias bytes of a compiled executable, or None if unknown."""
  stats = compiled.memory_analysis()
  if stats is None:
    return None
  return int(
    stats.argument_size_in_bytes
    + stats.output_size_in_bytes
    + stats.temp_size_in_bytes
    - stats.alias_size_in_bytes
  )


def _compile(method: models.Method, initial_params: PyTree, x: jax.Array) -> _Runner:
  """Compiles `method.step` for x, starting from a device copy of host `initial_params`."""
  params = jax.tree_util.tree_map(lambda leaf: jax.device_put(leaf.copy()), initial_params)
  opt_state = method.tx.init(params)
  compiled = jax.jit(method.step, donate_argnums=(0, 1)).lower(params, opt_state, x).compile()
  return _Runner(compiled, initial_params, params, opt_state, x)


def interleaved_times(
  timed: dict[str, Callable[[], Any]], repetitions: int, calls: dict[str, int]
) -> dict[str, list[float]]:
  """Seconds per call of each function in each repetition: `calls[name]` calls back to back,
  timed until their result is ready, the functions interleaved with the order rotating from
  one repetition to the next. Each function is called once first (compilation, warm-up)."""
  for run in timed.values():
    jax.block_until_ready(run())
  names = list(timed)
  times: dict[str, list[float]] = {name: [] for name in names}
  for repetition in range(repetitions):
    shift = repetition % max(len(names), 1)
    for name in names[shift:] + names[:shift]:
      start = time.perf_counter()
      for _ in range(calls[name]):
        result = timed[name]()
      jax.block_until_ready(result)
      times[name].append((time.perf_counter() - start) / calls[name])
  return times


def measure_point(
  methods: dict[str, models.Method],
  config: BenchmarkConfig,
  batch: int,
  width: int,
  predicted_s: dict[str, float],
) -> list[Measurement]:
  """Interleaved timings of every method at (B, D); skips those predicted or seen over the cap."""
  data_key, init_key = jax.random.split(jax.random.PRNGKey(config.seed))
  x = jax.random.normal(data_key, (batch, width), jnp.float32)
  skipped, runners, memory, steps = {}, {}, {}, {}
  initial_params = {}  # Host copies, shared by the methods that train the same model.
  for name, method in methods.items():
    if predicted_s.get(name, 0.0) > config.time_cap_s:
      skipped[name] = f"predicted {predicted_s[name]:.3g} s > cap {config.time_cap_s:g} s"
      continue
    if method.model not in initial_params:
      initial_params[method.model] = jax.device_get(
        jax.jit(method.model.init)(init_key, x)["params"]
      )
    runner = _compile(method, initial_params[method.model], x)
    memory[name] = compiled_memory_bytes(runner.compiled)
    start = time.perf_counter()
    jax.block_until_ready(runner.step())
    warm_up_s = time.perf_counter() - start
    if warm_up_s > config.time_cap_s:
      skipped[name] = f"warm-up step {warm_up_s:.3g} s > cap {config.time_cap_s:g} s"
      continue
    runners[name] = runner
    steps[name] = max(1, math.ceil(config.min_repetition_s / warm_up_s))
  times = interleaved_times(
    {name: runner.step for name, runner in runners.items()}, config.repetitions, steps
  )
  measurements = []
  for name in methods:
    if name in runners:
      runner = runners.pop(name)  # Frees the buffers before the next method is checked.
      measurements.append(
        Measurement(name, batch, width, tuple(times[name]), memory[name], *runner.params_health())
      )
    else:
      measurements.append(
        Measurement(name, batch, width, (), memory.get(name), skip_reason=skipped[name])
      )
  return measurements


def run_benchmark(config: BenchmarkConfig, log: Callable[[str], None] = print) -> list[Measurement]:
  """All measurements of the grid, D increasing within each B (see `measure_point`)."""
  methods = {
    name: models.make_method(
      name, config.num_layers, config.alpha, config.learning_rate, config.spline_bins
    )
    for name in models.METHODS
  }
  measurements = []
  for batch in config.batch_sizes:
    last: dict[str, Measurement] = {}
    for width in sorted(config.widths):
      predicted_s = {name: _predicted_s(last.get(name), width) for name in methods}
      for measurement in measure_point(methods, config, batch, width, predicted_s):
        measurements.append(measurement)
        log(_describe(measurement))
        last[measurement.method] = measurement
  return measurements


def _predicted_s(previous: Measurement | None, width: int) -> float:
  """Time at `width` extrapolated from the previous point with the nominal cost exponent."""
  if previous is None:
    return 0.0
  if previous.skipped:
    return math.inf
  return previous.median_s * (width / previous.width) ** models.COST_EXPONENT[previous.method]


def _describe(m: Measurement) -> str:
  where = f"B={m.batch:<4d} D={m.width:<5d} {m.method:<8s}"
  if m.skipped:
    return f"{where} skipped: {m.skip_reason}"
  health = (
    "" if m.params_finite and m.params_changed else " WARNING: params non-finite or unchanged"
  )
  return (
    f"{where} {1e3 * m.median_s:10.3f} ms/step (min {1e3 * min(m.times_s):.3f}, "
    f"max {1e3 * max(m.times_s):.3f}){health}"
  )


def device_label() -> str:
  """E.g. 'cpu (cpu), 2 CPU cores, jax 0.10.2, OPENBLAS_NUM_THREADS=1'."""
  device = jax.devices()[0]
  openblas_threads = os.environ.get("OPENBLAS_NUM_THREADS", "unset")
  return (
    f"{device.platform} ({device.device_kind}), {os.cpu_count()} CPU cores, "
    f"jax {jax.__version__}, OPENBLAS_NUM_THREADS={openblas_threads}"
  )
