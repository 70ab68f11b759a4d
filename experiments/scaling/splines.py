"""What learned splines add to a training step, and where the time goes.

    python -m experiments.scaling.splines
    python -m experiments.scaling.splines --width=784 --batch=100 --num_layers=8 --bins=8
    python -m experiments.scaling.splines --profile_calls=20

Times, side by side in one process (interleaved repetitions, medians), one jitted training
step (`fr.relative_update` + Adam) of a `FlowMLP` without splines and the same flow with a
`spline_bins`-bin `RationalQuadraticSpline` before every dense layer, and, for the breakdown,
the forward pass and gradient of each part of one layer on the same (B, D) batch: the dense
map z W + b, the activation with its log-derivative, and the spline with its log-derivative.
The arithmetic sets what the splines should cost: a dense layer is O(B·D²) (2·B·D² flops
forward, twice that backward), a spline O(B·D·K) in elementwise work, so at D = 784 and
K = 8 a spline is a few percent of a dense layer.

With `--profile_calls=N` it then traces N more calls of each step and prints, by kind of
kernel (`kernel_profile`: matrix products, elementwise fusions, gathers, scatters, ...), how
many kernels one step runs and their traced time: where the splines' time goes.

OpenBLAS is limited to one thread unless OPENBLAS_NUM_THREADS is set (by importing
`experiments`, see its docstring).
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence
import functools
import statistics
import time
from typing import Any

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import optax

import flax_relgrad as fr
from experiments.scaling import kernel_profile
from experiments.scaling import timing

FLAGS = flags.FLAGS if __name__ == "__main__" else flags.FlagValues()
"""absl's global flags when run, its own when imported (see experiments/scaling/__main__.py)."""
flags.DEFINE_integer("width", 784, "D.", flag_values=FLAGS)
flags.DEFINE_integer("batch", 100, "B.", flag_values=FLAGS)
flags.DEFINE_integer("num_layers", 8, "L, dense layers per flow.", flag_values=FLAGS)
flags.DEFINE_integer("bins", 8, "K, spline bins.", flag_values=FLAGS)
flags.DEFINE_float("bound", 14.0, "The splines' interval [−B, B].", flag_values=FLAGS)
flags.DEFINE_integer("repetitions", 9, "Interleaved repetitions.", flag_values=FLAGS)
flags.DEFINE_float(
  "min_repetition_s", 0.2, "Each repetition runs calls for about this long.", flag_values=FLAGS
)
flags.DEFINE_integer(
  "profile_calls", 0, "Traced calls per step for the kernel profile; 0: none.", flag_values=FLAGS
)

Timed = Callable[[], Any]


def training_step(
  model: fr.FlowMLP, x: jax.Array, learning_rate: float = 1e-4
) -> tuple[Timed, str]:
  """One relative-gradient Adam step of `model` on x, compiled, params donated (as in
  training), and the compiled step's optimised HLO text."""
  params = model.init(jax.random.PRNGKey(0), x, method="log_prob")["params"]
  tx = optax.adam(learning_rate)
  state = {"params": params, "opt_state": tx.init(params)}
  step = jax.jit(functools.partial(fr.relative_update, model, tx), donate_argnums=(0, 1))
  compiled = step.lower(state["params"], state["opt_state"], x).compile()

  def run():
    state["params"], state["opt_state"], loss = compiled(state["params"], state["opt_state"], x)
    return loss

  return run, compiled.as_text()


def part_forward_and_grad(module: Any, x: jax.Array, method: str) -> Timed:
  """Forward pass and gradient (w.r.t. its params and input) of one part of a layer: the loss
  is the sum of its outputs and log-derivatives, jitted."""
  variables = module.init(jax.random.PRNGKey(1), x, method=method)

  def loss(variables, x):
    out = module.apply(variables, x, method=method)
    return sum(jnp.sum(o) for o in (out if isinstance(out, tuple) else (out,)))

  grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
  return lambda: grad(variables, x)


def activation_forward_and_grad(activation: fr.Activation, x: jax.Array) -> Timed:
  """The activation and its log-derivative, forward and gradient w.r.t. the input, jitted."""
  grad = jax.jit(jax.grad(lambda x: jnp.sum(activation(x)) + jnp.sum(activation.log_derivative(x))))
  return lambda: grad(x)


def calls_per_repetition(timed: dict[str, Timed], min_repetition_s: float) -> dict[str, int]:
  """How many back-to-back calls of each function fill about `min_repetition_s` (at least 1),
  from the time of one call after a first (compiling) one."""
  calls = {}
  for name, run in timed.items():
    jax.block_until_ready(run())
    start = time.perf_counter()
    jax.block_until_ready(run())
    calls[name] = max(1, round(min_repetition_s / max(time.perf_counter() - start, 1e-6)))
  return calls


def main(argv: Sequence[str]) -> None:
  """Times the steps and the parts and prints the table; `argv` is the command line, program
  name first."""
  arguments = FLAGS(argv)[1:]
  if arguments:
    raise app.UsageError(f"Unexpected arguments: {arguments}")
  width, batch, layers, bins = FLAGS.width, FLAGS.batch, FLAGS.num_layers, FLAGS.bins
  x = jax.random.normal(jax.random.PRNGKey(2), (batch, width)) * 3.0
  activation = fr.SmoothLeakyReLU(0.01)
  steps = {
    "without splines": training_step(fr.FlowMLP(layers, activation), x),
    "with splines": training_step(
      fr.FlowMLP(layers, activation, spline_bins=bins, spline_bound=FLAGS.bound), x
    ),
  }
  timed = {
    **{f"step {name}": run for name, (run, _) in steps.items()},
    "dense z W + b": part_forward_and_grad(fr.FlowDense(), x, "__call__"),
    "activation": activation_forward_and_grad(activation, x),
    "spline": part_forward_and_grad(
      fr.RationalQuadraticSpline(bins, FLAGS.bound), x, "forward_and_log_det"
    ),
  }
  calls = calls_per_repetition(timed, FLAGS.min_repetition_s)
  times = timing.interleaved_times(timed, FLAGS.repetitions, calls)
  medians = {name: statistics.median(values) for name, values in times.items()}
  print(
    f"Device: {jax.devices()[0].device_kind}. B = {batch}, D = {width}, L = {layers}, "
    f"K = {bins}; median of {FLAGS.repetitions} interleaved repetitions.\n"
  )
  print("| | ms | relative to |\n|---|---:|---|")
  base, dense = medians["step without splines"], medians["dense z W + b"]
  for name, seconds in medians.items():
    reference = (
      f"{seconds / base:.2f}× the step without splines"
      if name.startswith("step")
      else f"{seconds / dense:.3f}× the dense map"
    )
    print(f"| {name} | {1e3 * seconds:.2f} | {reference} |")
  if FLAGS.profile_calls:
    print(profile_table(steps, FLAGS.profile_calls))


def profile_table(steps: dict[str, tuple[Timed, str]], calls: int) -> str:
  """`kernel_profile.profile_by_kind` of each step ((run, HLO text) by name), as a table of
  kernels per step and traced milliseconds per step by kind of kernel."""
  profiles = {
    name: kernel_profile.profile_by_kind(run, hlo, calls) for name, (run, hlo) in steps.items()
  }
  kinds = list(dict.fromkeys(kind for profile in profiles.values() for kind in profile))
  names = list(profiles)
  lines = [
    f"\nKernels of one step by kind, traced over {calls} calls of each step (tracing slows "
    "kernels; compare the columns, not with the timings above).\n",
    "| kind | " + " | ".join(f"kernels {n} | ms {n}" for n in names) + " |",
    "|---|" + "---:|---:|" * len(names),
  ]
  for kind in kinds + ["all"]:
    cells = []
    for name in names:
      profile = profiles[name]
      parts = profile.values() if kind == "all" else [profile.get(kind, (0.0, 0.0))]
      count, seconds = sum(c for c, _ in parts), sum(s for _, s in parts)
      cells += [f"{count:.0f}", f"{1e3 * seconds:.2f}"]
    lines.append(f"| {kind} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


if __name__ == "__main__":
  app.run(main)
