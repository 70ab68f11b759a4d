"""Time one jitted training step (gradient + Adam update) of four dense flows against the width D.

Methods, all with L square layers, SmoothLeakyReLU(α) between layers, float32, batch x (B, D):

- ``relative``: `FlowMLP`, `value_and_relative_grad_args` + `relative_jacobian()` + Adam.
  Exact maximum likelihood at O(B·D²) per layer (docs/method.md, "Cost").
- ``naive``: `FlowMLP`, `value_and_exact_grad` (autodiff through `slogdet`) + Adam. O(D³).
- ``plain``: `FlowMLP` trained on −[Σ log N(z) + Σ log σ'(y)] only (no log|det W|), plain
  `jax.grad` + Adam: the backprop floor of a dense network of this shape.
- ``lu``: `LUFlow`, Glow-style W = P·L·(U + diag(s)), log|det W| = Σ log|s|; exact NLL,
  plain autodiff + Adam. O(B·D²), but W is constrained to its LU parameterisation.

Each step is compiled once per (method, B, D) with the params and optimizer state donated; the
compile and a first warm-up call are excluded from the timings. Methods are interleaved within
the process: every repetition runs each method once, for as many steps back to back as fill
`min_repetition_s` by the warm-up time (at least one), in an order that rotates with the
repetition, so that machine noise hits all methods alike.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import math
import os
import pathlib
import statistics
import time
from typing import Any, Callable, Iterable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import flax_relgrad as fr
from experiments.types import PyTree

StepFn = Callable[[PyTree, PyTree, jax.Array], tuple[PyTree, PyTree, jax.Array]]

METHODS = ("relative", "naive", "plain", "lu")
COST_EXPONENT = {"relative": 2, "naive": 3, "plain": 2, "lu": 2}
"""Nominal k in cost ∝ D^k (docs/method.md, "Cost"), used to predict whether a point exceeds the cap."""

MEMORY_SOURCE = "compiled executable: argument + output + temp − aliased (donated) bytes"


@dataclasses.dataclass(frozen=True)
class BenchmarkConfig:
  """What to measure.

  Attributes:
    widths: the grid of D, measured in increasing order.
    batch_sizes: the grid of B.
    num_layers: L, dense layers per flow.
    alpha: slope α of SmoothLeakyReLU(α).
    learning_rate: Adam's learning rate.
    repetitions: interleaved repetitions per point; the report gives medians over them.
    min_repetition_s: one repetition of a method runs ⌈min_repetition_s / warm-up time⌉ ≥ 1
      steps back to back and records their mean time per step.
    time_cap_s: a method whose step is predicted (from its previous D and `COST_EXPONENT`) or
      measured on its warm-up call to exceed this is skipped at this and all larger D.
    fit_min_width: the exponent k of time ∝ D^k is fitted over points with D ≥ this.
    seed: seed of the data and the initial parameters.
  """

  widths: tuple[int, ...] = (64, 128, 256, 512, 784, 1024, 2048, 4096)
  batch_sizes: tuple[int, ...] = (10, 100)
  num_layers: int = 2
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


# --------------------------------------------------------------------------- LU flow (Glow)


class LUDense(nn.Module):
  """y = z W + b with W = P·L·(U + diag(s)) (Kingma & Dhariwal, 2018), for z (..., D).

  P is a fixed permutation (drawn from `permutation_seed`), L is unit lower triangular, U
  strictly upper triangular, and log|det W| = Σ_i log|s_i| costs O(D). The parameters
  start at L = I, U = 0, s = 1 (W = P).

  Attributes:
    permutation_seed: seed of the fixed permutation P.
  """

  permutation_seed: int = 0

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    width = z.shape[-1]
    permutation = np.random.default_rng(self.permutation_seed).permutation(width)
    lower = self.param("lower", nn.initializers.zeros, (width, width))
    upper = self.param("upper", nn.initializers.zeros, (width, width))
    scale = self.param("scale", nn.initializers.ones, (width,))
    bias = self.param("bias", nn.initializers.zeros, (width,))
    unit_lower = jnp.tril(lower, -1) + jnp.eye(width, dtype=lower.dtype)
    upper_and_diagonal = jnp.triu(upper, 1) + jnp.diag(scale)
    # z P permutes the coordinates of z: (z P)_j = z_{π(j)} for P_{π(j), j} = 1.
    return (z[..., permutation] @ unit_lower) @ upper_and_diagonal + bias

  def log_abs_det(self) -> jax.Array:
    """log|det W| = Σ_i log|s_i| (a scalar)."""
    return jnp.sum(jnp.log(jnp.abs(self.get_variable("params", "scale"))))


class LUFlow(nn.Module):
  """`num_layers` `LUDense` layers with `activation` in between (none after the last).

  Attributes:
    num_layers: L ≥ 1.
    activation: strictly increasing activation with a log-derivative.
  """

  num_layers: int = 2
  activation: fr.Activation = fr.SmoothLeakyReLU()

  def setup(self):
    self.layers = [LUDense(permutation_seed=index) for index in range(self.num_layers)]

  def __call__(self, x: jax.Array) -> jax.Array:
    """Data x (..., D) → latent z (..., D)."""
    return self.log_prob(x)

  def log_prob(self, x: jax.Array) -> jax.Array:
    """Exact log p(x) per example, shape (...): log N(z) + Σ log σ'(y) + Σ_k Σ_i log|s_k,i|."""
    z = x
    log_det = jnp.zeros(x.shape[:-1], x.dtype)
    for index, layer in enumerate(self.layers):
      z = layer(z)
      log_det = log_det + layer.log_abs_det()
      if index < self.num_layers - 1:
        log_det = log_det + self.activation.log_derivative(z).sum(-1)
        z = self.activation(z)
    return fr.standard_normal_log_prob(z) + log_det


# --------------------------------------------------------------------------- training steps


@dataclasses.dataclass(frozen=True)
class Method:
  """A model, its optimizer and one training step (params, opt_state, x) → (params, opt_state, loss)."""

  name: str
  model: nn.Module
  tx: optax.GradientTransformation
  step: StepFn


def _euclidean_step(
    value_and_grad_fn: Callable[[PyTree, jax.Array], tuple[jax.Array, PyTree]],
    tx: optax.GradientTransformation,
) -> StepFn:
  """One `tx` step on the Euclidean gradient from value_and_grad_fn(params, x) → (loss, grads)."""

  def step(params, opt_state, x):
    loss, grads = value_and_grad_fn(params, x)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return step


def _relative_step(model: fr.FlowMLP, tx: optax.GradientTransformationExtraArgs) -> StepFn:
  """One step of `relative_jacobian()` + Adam: exact NLL at O(B·D²) per layer."""

  def step(params, opt_state, x):
    loss, grads, extra = fr.value_and_relative_grad_args(model, params, x)
    updates, opt_state = tx.update(grads, opt_state, params, **extra)
    return optax.apply_updates(params, updates), opt_state, loss

  return step


def make_method(name: str, num_layers: int, alpha: float, learning_rate: float) -> Method:
  """The model, optimizer and training step of benchmark method `name` (one of `METHODS`)."""
  activation = fr.SmoothLeakyReLU(alpha)
  adam = optax.adam(learning_rate)
  if name == "lu":
    model = LUFlow(num_layers, activation)
    nll = lambda params, x: -jnp.mean(model.apply({"params": params}, x, method=LUFlow.log_prob))
    return Method(name, model, adam, _euclidean_step(jax.value_and_grad(nll), adam))
  model = fr.FlowMLP(num_layers, activation)
  if name == "relative":
    tx = optax.chain(fr.relative_jacobian(), adam)
    return Method(name, model, tx, _relative_step(model, tx))
  if name == "naive":  # Autodiff through slogdet.
    exact = functools.partial(fr.value_and_exact_grad, model)
    return Method(name, model, adam, _euclidean_step(exact, adam))
  if name == "plain":  # −[Σ log N(z) + Σ log σ'(y)]: no log|det W| at all.

    def loss_fn(params, x):
      z, activation_log_det = model.apply(
          {"params": params}, x, method=fr.FlowMLP.forward_and_activation_log_det
      )
      return -jnp.mean(fr.standard_normal_log_prob(z) + activation_log_det)

    return Method(name, model, adam, _euclidean_step(jax.value_and_grad(loss_fn), adam))
  raise ValueError(f"Unknown method {name!r}; expected one of {METHODS}.")


# --------------------------------------------------------------------------- timing


@dataclasses.dataclass
class _Runner:
  """A compiled, donated step of one method at one point, with its live params and state."""

  compiled: Any
  initial_params: PyTree
  params: PyTree
  opt_state: PyTree
  x: jax.Array

  def run(self, steps: int) -> float:
    """Runs `steps` steps; returns the wall-clock seconds per step (until results are ready)."""
    start = time.perf_counter()
    for _ in range(steps):
      self.params, self.opt_state, loss = self.compiled(self.params, self.opt_state, self.x)
    jax.block_until_ready((self.params, self.opt_state, loss))
    return (time.perf_counter() - start) / steps

  def params_health(self) -> tuple[bool, bool]:
    """(all params finite, every param array differs from its initial value somewhere)."""
    params = jax.tree_util.tree_leaves(jax.device_get(self.params))
    initial = jax.tree_util.tree_leaves(self.initial_params)
    finite = all(np.isfinite(leaf).all() for leaf in params)
    return finite, all(np.any(a != b) for a, b in zip(params, initial))


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


def _compile(method: Method, initial_params: PyTree, x: jax.Array) -> _Runner:
  """Compiles `method.step` for x, starting from a device copy of host `initial_params`."""
  params = jax.tree_util.tree_map(lambda leaf: jax.device_put(leaf.copy()), initial_params)
  opt_state = method.tx.init(params)
  compiled = jax.jit(method.step, donate_argnums=(0, 1)).lower(params, opt_state, x).compile()
  return _Runner(compiled, initial_params, params, opt_state, x)


def _interleaved_times(
    runners: dict[str, _Runner], steps: dict[str, int], repetitions: int
) -> dict[str, list[float]]:
  """Seconds per step of each runner per repetition; the order rotates with the repetition."""
  names = list(runners)
  times = {name: [] for name in names}
  for repetition in range(repetitions):
    shift = repetition % max(len(names), 1)
    for name in names[shift:] + names[:shift]:
      times[name].append(runners[name].run(steps[name]))
  return times


def measure_point(
    methods: dict[str, Method],
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
      initial_params[method.model] = jax.device_get(jax.jit(method.model.init)(init_key, x)["params"])
    runner = _compile(method, initial_params[method.model], x)
    memory[name] = compiled_memory_bytes(runner.compiled)
    warm_up_s = runner.run(1)
    if warm_up_s > config.time_cap_s:
      skipped[name] = f"warm-up step {warm_up_s:.3g} s > cap {config.time_cap_s:g} s"
      continue
    runners[name] = runner
    steps[name] = max(1, math.ceil(config.min_repetition_s / warm_up_s))
  times = _interleaved_times(runners, steps, config.repetitions)
  measurements = []
  for name in methods:
    if name in runners:
      runner = runners.pop(name)  # Frees the buffers before the next method is checked.
      measurements.append(Measurement(
          name, batch, width, tuple(times[name]), memory[name], *runner.params_health()))
    else:
      measurements.append(Measurement(name, batch, width, (), memory.get(name), skip_reason=skipped[name]))
  return measurements


def run_benchmark(
    config: BenchmarkConfig, log: Callable[[str], None] = print
) -> list[Measurement]:
  """All measurements of the grid, D increasing within each B (see `measure_point`)."""
  methods = {name: make_method(name, config.num_layers, config.alpha, config.learning_rate) for name in METHODS}
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
  return previous.median_s * (width / previous.width) ** COST_EXPONENT[previous.method]


def _describe(m: Measurement) -> str:
  where = f"B={m.batch:<4d} D={m.width:<5d} {m.method:<8s}"
  if m.skipped:
    return f"{where} skipped: {m.skip_reason}"
  health = "" if m.params_finite and m.params_changed else " WARNING: params non-finite or unchanged"
  return (f"{where} {1e3 * m.median_s:10.3f} ms/step (min {1e3 * min(m.times_s):.3f}, "
          f"max {1e3 * max(m.times_s):.3f}){health}")


# --------------------------------------------------------------------------- reports


def device_label() -> str:
  """E.g. 'cpu (cpu), 2 CPU cores, jax 0.10.2, OPENBLAS_NUM_THREADS=1'."""
  device = jax.devices()[0]
  openblas_threads = os.environ.get("OPENBLAS_NUM_THREADS", "unset")
  return (f"{device.platform} ({device.device_kind}), {os.cpu_count()} CPU cores, "
          f"jax {jax.__version__}, OPENBLAS_NUM_THREADS={openblas_threads}")


def fitted_exponent(points: Iterable[Measurement], min_width: int) -> float:
  """k of median time ∝ D^k by least squares in log-log over measured points with D ≥ min_width."""
  kept = [(m.width, m.median_s) for m in points if not m.skipped and m.width >= min_width]
  if len(kept) < 2:
    return math.nan
  widths, times = np.log(np.array(kept, dtype=np.float64)).T
  return float(np.polyfit(widths, times, 1)[0])


def write_csv(measurements: Sequence[Measurement], path: pathlib.Path) -> None:
  """One row per (method, B, D): status, median / quartiles / min / max seconds, memory."""
  with open(path, "w", newline="") as file:
    writer = csv.writer(file)
    writer.writerow(
        ["method", "batch", "width", "status", "median_s", "q25_s", "q75_s", "min_s", "max_s",
         "samples", "memory_bytes", "params_finite", "params_changed", "note"]
    )
    for m in measurements:
      writer.writerow([
          m.method, m.batch, m.width, "skipped" if m.skipped else "ok",
          f"{m.median_s:.6g}", f"{m.quantile_s(0.25):.6g}", f"{m.quantile_s(0.75):.6g}",
          f"{min(m.times_s, default=math.nan):.6g}", f"{max(m.times_s, default=math.nan):.6g}",
          len(m.times_s), "" if m.memory_bytes is None else m.memory_bytes,
          m.params_finite, m.params_changed, m.skip_reason,
      ])


def _ratio(numerator: Measurement, denominator: Measurement) -> str:
  if numerator.skipped or denominator.skipped:
    return "–"
  return f"{numerator.median_s / denominator.median_s:.2f}"


def _milliseconds(m: Measurement) -> str:
  return "skipped" if m.skipped else f"{1e3 * m.median_s:.3f}"


def _mebibytes(m: Measurement) -> str:
  return "–" if m.memory_bytes is None or m.skipped else f"{m.memory_bytes / 2**20:.1f}"


def markdown_report(measurements: Sequence[Measurement], config: BenchmarkConfig) -> str:
  """Time table with ratios, fitted exponents and memory table, as markdown."""
  by_key = {(m.method, m.batch, m.width): m for m in measurements}
  points = sorted({(m.batch, m.width) for m in measurements})
  batches = sorted({batch for batch, _ in points})
  lines = [
      "# Training-step time against the width D",
      "",
      f"Device: {device_label()}. FlowMLP / LUFlow with {config.num_layers} layers, "
      f"SmoothLeakyReLU({config.alpha:g}), float32, Adam({config.learning_rate:g}); one jitted "
      "step = gradient + optimizer update (compile and warm-up excluded). Median over "
      f"{config.repetitions} interleaved repetitions, each ≥ 1 step and ≈ ≥ "
      f"{config.min_repetition_s:g} s. "
      f"Points whose step is predicted or seen to exceed {config.time_cap_s:g} s are skipped.",
      "",
      "## Median milliseconds per step",
      "",
      "| B | D | " + " | ".join(METHODS) + " | naive/relative | relative/plain | lu/relative |",
      "|---:|---:|" + "---:|" * (len(METHODS) + 3),
  ]
  for batch, width in points:
    m = {name: by_key[name, batch, width] for name in METHODS}
    cells = [_milliseconds(m[name]) for name in METHODS]
    cells += [_ratio(m["naive"], m["relative"]), _ratio(m["relative"], m["plain"]),
              _ratio(m["lu"], m["relative"])]
    lines.append(f"| {batch} | {width} | " + " | ".join(cells) + " |")
  lines += [
      "",
      f"## Fitted exponent k of time ∝ D^k (least squares in log-log, D ≥ {config.fit_min_width})",
      "",
      "| B | " + " | ".join(METHODS) + " |",
      "|---:|" + "---:|" * len(METHODS),
  ]
  for batch in batches:
    exponents = [
        fitted_exponent((m for m in measurements if m.method == name and m.batch == batch),
                        config.fit_min_width)
        for name in METHODS
    ]
    lines.append(f"| {batch} | " + " | ".join(f"{k:.2f}" for k in exponents) + " |")
  lines += [
      "",
      f"## Memory (MiB; {MEMORY_SOURCE}, from `compiled.memory_analysis()`)",
      "",
      "| B | D | " + " | ".join(METHODS) + " |",
      "|---:|---:|" + "---:|" * len(METHODS),
  ]
  for batch, width in points:
    cells = [_mebibytes(by_key[name, batch, width]) for name in METHODS]
    lines.append(f"| {batch} | {width} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def plot(measurements: Sequence[Measurement], path: pathlib.Path) -> None:
  """Log-log plot of median seconds per step against D, one panel per batch size."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  batches = sorted({m.batch for m in measurements})
  figure, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 4), squeeze=False)
  for axis, batch in zip(axes[0], batches):
    for name in METHODS:
      kept = sorted((m.width, m.median_s) for m in measurements
                    if m.method == name and m.batch == batch and not m.skipped)
      if kept:
        widths, times = zip(*kept)
        axis.loglog(widths, times, marker="o", label=name)
    axis.set(title=f"B = {batch}", xlabel="width D", ylabel="seconds per training step")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend()
  figure.suptitle(device_label(), fontsize=9)
  figure.tight_layout()
  figure.savefig(path, dpi=120)
  plt.close(figure)


def write_reports(
    measurements: Sequence[Measurement], config: BenchmarkConfig, output_dir: pathlib.Path
) -> str:
  """Writes scaling.csv, scaling.md and scaling.png into output_dir; returns the markdown."""
  output_dir.mkdir(parents=True, exist_ok=True)
  write_csv(measurements, output_dir / "scaling.csv")
  report = markdown_report(measurements, config)
  (output_dir / "scaling.md").write_text(report)
  plot(measurements, output_dir / "scaling.png")
  return report
