"""How loose is a trained image flow's test bound? `python -m experiments.mnist.importance
--workdir=runs/mnist [--num_draws=256] [--num_images=1000]`.

The program's test bits/dim come from one dequantisation draw per image: for pixels p (D of
them) and the model's density of the dequantised pixels p + u, u ~ U[0, 1)^D (see
`images.pixel_log_probs`), Jensen's inequality gives

    log P(p) = log E_u[p(p + u)] ≥ E_u[log p(p + u)],

and one draw estimates the right-hand side. With K draws, the importance-weighted bound
log (1/K) Σ_k p(p + u_k) lies between the two in expectation and rises to log P(p) as K grows
(Burda, Grosse and Salakhutdinov, 2016). Its gain over the single-draw bound is a lower bound
on the gap log P(p) − E_u[log p(p + u)] = KL(U ‖ p(u | p)), the most that any learned
dequantiser q(u | p) (Flow++'s variational dequantisation) could add to this model's bound.

It prints both bounds in bits/dim over the first `num_images` test images of the workdir's
dataset (its config.json), means ± 2 standard errors over images, and their paired difference.
Works for any run of `experiments.mnist` or `experiments.cifar10`.
"""

from __future__ import annotations

import functools
import math

from absl import app
from absl import flags
import jax
import numpy as np

import flax_relgrad as fr
from experiments import images
from experiments.training import evaluation
from experiments.training.runs import TrainedRun
from experiments.training.runs import load_run

INPUTS_PER_CALL = 1024
"""Model inputs per jitted call: (images per call) × K."""


def single_and_weighted_bounds(log_probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per image, from pixel log-densities (N, K) at K draws (nats): the single-draw bound
  E_u[log p(p + u)] estimated by the draws' mean, and the importance-weighted bound
  log (1/K) Σ_k p(p + u_k); both (N,) nats."""
  largest = log_probs.max(axis=1)
  weighted = largest + np.log(np.exp(log_probs - largest[:, None]).mean(axis=1))
  return log_probs.mean(axis=1), weighted


def dequantisation_bounds(
  workdir: str, num_draws: int, num_images: int, seed: int = 0
) -> tuple[TrainedRun, dict[str, np.ndarray]]:
  """The run of `workdir` (best checkpoint) and, over its first `num_images` test images, the
  per-image bits/dim (N,) of the single-draw bound (`single`) and of the importance-weighted
  bound with `num_draws` draws (`weighted`)."""
  if num_draws < 1 or num_images < 1:
    raise ValueError(f"num_draws and num_images must be >= 1, got {num_draws} and {num_images}.")
  run = load_run(workdir)
  if run.config.get("data_source") != "images":
    raise ValueError(
      f"{workdir} trained on {run.config.get('data_source')!r} data; the dequantisation "
      "bound is defined for images only (experiments.mnist, experiments.cifar10)."
    )
  test = images.load_splits(run.config).test.take(num_images)
  log_prob = functools.partial(run.model.apply, {"params": run.params}, method=fr.FlowMLP.log_prob)
  log_probs_of = jax.jit(
    lambda batch, key: images.pixel_log_probs(log_prob, batch, key, run.config.lam, num_draws)
  )
  key = jax.random.PRNGKey(seed)
  batches = test.batch(max(1, INPUTS_PER_CALL // num_draws)).as_numpy_iterator()
  log_probs = np.concatenate(
    [
      np.asarray(log_probs_of(batch, jax.random.fold_in(key, index)), np.float64)
      for index, batch in enumerate(batches)
    ]
  )
  to_bits = lambda nats: -nats / (math.prod(run.config.image_shape) * math.log(2.0))
  single, weighted = single_and_weighted_bounds(log_probs)
  return run, {"single": to_bits(single), "weighted": to_bits(weighted)}


def describe(workdir: str, run: TrainedRun, bounds: dict[str, np.ndarray], num_draws: int) -> str:
  """The bounds' means ± 2 standard errors over images, and their paired difference."""
  lines = [
    f"{workdir} (best checkpoint, step {run.step}), {len(bounds['single'])} test images, "
    f"K = {num_draws}:"
  ]
  for name, values in (
    ("single-draw bound", bounds["single"]),
    (f"importance-weighted bound (K = {num_draws})", bounds["weighted"]),
    ("difference", bounds["single"] - bounds["weighted"]),
  ):
    mean, two_se = evaluation.mean_and_two_standard_errors(values)
    lines.append(f"  {name}: {mean:.4f} ± {two_se:.4f} bits/dim")
  return "\n".join(lines)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  workdir, num_draws = flags.FLAGS.workdir, flags.FLAGS.num_draws
  try:
    run, bounds = dequantisation_bounds(
      workdir, num_draws, flags.FLAGS.num_images, flags.FLAGS.seed
    )
  except (ValueError, FileNotFoundError) as error:  # bad flags or workdir: one line, no trace
    raise app.UsageError(str(error)) from error
  print(describe(workdir, run, bounds, num_draws))


if __name__ == "__main__":
  flags.DEFINE_string("workdir", None, "The --workdir of an image run (experiments.mnist, ...).")
  flags.DEFINE_integer("num_draws", 256, "Dequantisation draws per image (K).")
  flags.DEFINE_integer("num_images", 1000, "How many test images, from the first.")
  flags.DEFINE_integer("seed", 0, "Seed of the dequantisation draws.")
  flags.mark_flags_as_required(["workdir"])
  app.run(main)
