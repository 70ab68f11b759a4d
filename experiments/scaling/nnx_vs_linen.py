"""Time the NNX relative-gradient training step against the Linen one, side by side.

    python -m experiments.scaling.nnx_vs_linen
    python -m experiments.scaling.nnx_vs_linen --width=784 --batch_size=100 --repetitions=9

Both steps train the same `FlowMLP` (L layers, SmoothLeakyReLU(α), float32, orthogonal init)
with Adam on their relative gradients, on one fixed batch (B, D):

- ``linen``: `jax.jit` of `fr.relative_update` (the library's one relative-gradient step:
  `value_and_relative_grad(model, nll)` + `tx.update` + `apply_updates`);
- ``nnx``: the idiom of the Flax NNX examples, `nnx.jit` of
  `flax_relgrad.nnx.value_and_relative_grad` + `nnx.Optimizer.update(model, grads)`
  (its Python-side graph traversal on every call included);
- ``nnx_cached``: the same step through `nnx.cached_partial(step, model, optimizer)`, Flax's
  way to skip most of that traversal in a training loop.

At small D the differences are the per-call Python overheads (try --width=8).

Each step is compiled and run once before timing. Every repetition runs each step `steps`
times back to back (blocking at the end), in an order that rotates with the repetition; the
report gives the median time per step over the repetitions and the ratios to linen.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence
import functools
import statistics

from absl import app
from absl import flags
from flax import nnx
import jax
import jax.numpy as jnp
import optax

import flax_relgrad as fr
import flax_relgrad.nnx as frn
from experiments.scaling import timing

FLAGS = flags.FLAGS if __name__ == "__main__" else flags.FlagValues()
"""This program's flags: absl's global ones when it runs, its own when imported, as by the tests,
where several programs share a process and define flags of the same names (--steps, --repetitions). Like
absl's global flags, those that a later `main(argv)` in the same process does not set keep their
values."""
flags.DEFINE_integer("width", 784, "D, the flow's width.", lower_bound=1, flag_values=FLAGS)
flags.DEFINE_integer(
  "batch_size", 100, "B, rows of the fixed batch.", lower_bound=1, flag_values=FLAGS
)
flags.DEFINE_integer("num_layers", 2, "L, dense layers.", lower_bound=1, flag_values=FLAGS)
flags.DEFINE_float("alpha", 0.01, "Slope α of SmoothLeakyReLU(α).", flag_values=FLAGS)
flags.DEFINE_float("learning_rate", 1e-4, "Adam's learning rate.", flag_values=FLAGS)
flags.DEFINE_integer(
  "repetitions", 9, "Repetitions; the report gives medians.", lower_bound=1, flag_values=FLAGS
)
flags.DEFINE_integer("steps", 20, "Steps per repetition.", lower_bound=1, flag_values=FLAGS)


def linen_step(
  num_layers: int, alpha: float, learning_rate: float, x: jax.Array
) -> Callable[[], jax.Array]:
  """A closure that runs one Linen step on x and returns the loss (state kept inside)."""
  model = fr.FlowMLP(num_layers, fr.SmoothLeakyReLU(alpha))
  params = model.init(jax.random.PRNGKey(0), x[:1])["params"]
  tx = optax.adam(learning_rate)
  state = {"params": params, "opt_state": tx.init(params)}

  step = jax.jit(functools.partial(fr.relative_update, model, tx))

  def run() -> jax.Array:
    state["params"], state["opt_state"], loss = step(state["params"], state["opt_state"], x)
    return loss

  return run


def nnx_step(
  width: int,
  num_layers: int,
  alpha: float,
  learning_rate: float,
  x: jax.Array,
  cached: bool = False,
) -> Callable[[], jax.Array]:
  """A closure that runs one NNX step on x and returns the loss (through
  `nnx.cached_partial` if `cached`)."""
  model = frn.FlowMLP(width, num_layers, activation=fr.SmoothLeakyReLU(alpha), rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.adam(learning_rate), wrt=nnx.Param)
  loss_fn = frn.value_and_relative_grad(lambda m, x: -m.log_prob(x).mean())

  @nnx.jit
  def step(model, optimizer, x):
    loss, grads = loss_fn(model, x)
    optimizer.update(model, grads)
    return loss

  if cached:
    cached_step = nnx.cached_partial(step, model, optimizer)
    return lambda: cached_step(x)
  return lambda: step(model, optimizer, x)


def main(argv: Sequence[str]) -> None:
  """Times the three steps and prints the report; `argv` is the command line, program name first."""
  arguments = FLAGS(argv)[1:]
  if arguments:
    raise app.UsageError(f"Unexpected arguments: {arguments}")
  x = jax.random.normal(jax.random.PRNGKey(1), (FLAGS.batch_size, FLAGS.width), jnp.float32)
  settings = (FLAGS.num_layers, FLAGS.alpha, FLAGS.learning_rate, x)
  steps = {
    "linen": linen_step(*settings),
    "nnx": nnx_step(FLAGS.width, *settings),
    "nnx_cached": nnx_step(FLAGS.width, *settings, cached=True),
  }
  times = timing.interleaved_times(steps, FLAGS.repetitions, dict.fromkeys(steps, FLAGS.steps))
  medians = {name: statistics.median(values) for name, values in times.items()}
  print(
    f"D = {FLAGS.width}, B = {FLAGS.batch_size}, L = {FLAGS.num_layers}, {FLAGS.repetitions} repetitions × "
    f"{FLAGS.steps} steps, {jax.devices()[0].device_kind}"
  )
  for name, values in times.items():
    print(
      f"{name:10s} median {1e3 * medians[name]:8.3f} ms/step "
      f"(min {1e3 * min(values):.3f}, max {1e3 * max(values):.3f})"
    )
  for name in ("nnx", "nnx_cached"):
    print(f"ratio {name} / linen = {medians[name] / medians['linen']:.3f}")


if __name__ == "__main__":
  app.run(main)
