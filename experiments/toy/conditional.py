"""`python -m experiments.toy.conditional --workdir=runs/toy_conditional`: a conditional 2-D density.

The family: for a scalar context c ~ U(−1, 1), a crescent whose curvature and orientation
depend on c,

    e ~ N(0, I₂),   u = (e₁, 0.4·e₂ + κ(c)·(e₁² − 1)),   x = R(θ(c)) u,
    κ(c) = 0.6·c,   θ(c) = π·c / 3   (R: rotation),

so log p(x | c) = log N(e₁) + log N(e₂) − log 0.4 exactly (the shear and the rotation keep
volume). A `ConditionalFlowMLP` with an MLP conditioner is trained on (x, c) pairs by `fr.fit`
(the library's array training: `fr.relative_update` scanned over each epoch, here with Adam,
warm-up and cosine decay, keeping the epoch with the best validation NLL); the program prints
the test log-likelihood ± 2 standard errors next to the truth's (the mean true log p of the
same test points), writes TensorBoard scalars (per epoch the training and validation NLL, and
the test log-likelihoods), and saves `conditional.png`: the true and the learned p(x | c) for
five contexts. A demo of the library's conditional flow, small enough to run in a couple of
minutes; it keeps no checkpoints.
"""

from __future__ import annotations

import math
import os

from absl import app
from absl import flags
from clu import metric_writers
import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
from matplotlib import figure as mpl_figure  # pylint: disable=g-import-not-at-top
from matplotlib.backends import backend_agg  # pylint: disable=g-import-not-at-top
import numpy as np
import optax

import flax_relgrad as fr
from experiments.training import evaluation

WORKDIR = flags.DEFINE_string(
  "workdir", None, "Where TensorBoard events and conditional.png go.", required=True
)
EPOCHS = flags.DEFINE_integer(
  "epochs", 80, "Training epochs of num_train // 200 steps (batch 200)."
)
SEED = flags.DEFINE_integer("seed", 0, "Seed of the data, the initialisation and the shuffling.")
NUM_TRAIN = flags.DEFINE_integer("num_train", 50_000, "Training pairs (x, c).")
NUM_VALIDATION = flags.DEFINE_integer("num_validation", 10_000, "Validation pairs (x, c).")
NUM_TEST = flags.DEFINE_integer("num_test", 10_000, "Test pairs (x, c).")

BATCH_SIZE = 200
PICTURE_CONTEXTS = (-1.0, -0.5, 0.0, 0.5, 1.0)
PLOT_RANGE = (-3.5, 3.5)


def curvature_and_angle(c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  return 0.6 * c, math.pi * c / 3


def sample_crescents(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """n pairs: x (n, 2) and their contexts c (n, 1)."""
  c = rng.uniform(-1.0, 1.0, (n, 1))
  e = rng.standard_normal((n, 2))
  curvature, angle = curvature_and_angle(c[:, 0])
  u = np.stack([e[:, 0], 0.4 * e[:, 1] + curvature * (e[:, 0] ** 2 - 1.0)], axis=1)
  cos, sin = np.cos(angle), np.sin(angle)
  x = np.stack([cos * u[:, 0] - sin * u[:, 1], sin * u[:, 0] + cos * u[:, 1]], axis=1)
  return x.astype(np.float32), c.astype(np.float32)


def true_log_prob(x: np.ndarray, c: np.ndarray) -> np.ndarray:
  """Exact log p(x | c) of the family, shape (n,)."""
  curvature, angle = curvature_and_angle(c[:, 0])
  cos, sin = np.cos(angle), np.sin(angle)
  u1, u2 = cos * x[:, 0] + sin * x[:, 1], -sin * x[:, 0] + cos * x[:, 1]
  e2 = (u2 - curvature * (u1**2 - 1.0)) / 0.4
  return -0.5 * (u1**2 + e2**2) - math.log(2 * math.pi) - math.log(0.4)


def make_model() -> fr.ConditionalFlowMLP:
  conditioner = nn.Sequential([nn.Dense(64), nn.gelu, nn.Dense(64), nn.gelu])
  return fr.ConditionalFlowMLP(
    num_layers=8, conditioner=conditioner, activation=fr.SmoothLeakyReLU(0.2)
  )


def draw(model: fr.ConditionalFlowMLP, params, path: str, grid_size: int = 150) -> None:
  """Two rows of heat maps, truth over learned p(x | c), one column per context."""
  axis = np.linspace(*PLOT_RANGE, grid_size, dtype=np.float32)
  grid = np.stack(np.meshgrid(axis, axis), axis=-1).reshape(-1, 2)
  figure = mpl_figure.Figure(figsize=(3 * len(PICTURE_CONTEXTS), 6))
  canvas = backend_agg.FigureCanvasAgg(figure)
  learned_log_prob = jax.jit(lambda x, c: model.apply({"params": params}, x, c, method="log_prob"))
  for column, context in enumerate(PICTURE_CONTEXTS):
    c = np.full((grid.shape[0], 1), context, np.float32)
    rows = [("truth", true_log_prob(grid, c)), ("learned", np.asarray(learned_log_prob(grid, c)))]
    for row, (title, log_prob) in enumerate(rows):
      axes = figure.add_subplot(2, len(PICTURE_CONTEXTS), row * len(PICTURE_CONTEXTS) + column + 1)
      axes.imshow(
        np.exp(log_prob).reshape(grid_size, grid_size),
        origin="lower",
        extent=(*PLOT_RANGE, *PLOT_RANGE),
        cmap="viridis",
      )
      axes.set_title(f"{title}, c = {context:+.1f}")
      axes.set_xticks([])
      axes.set_yticks([])
  figure.tight_layout()
  canvas.print_png(path)


def train_and_evaluate(
  workdir: str, epochs: int, seed: int, num_train: int, num_validation: int, num_test: int
) -> dict[str, float]:
  """Trains, evaluates, draws; returns the test log-likelihoods (model and truth).

  `fr.fit` runs `epochs` epochs of ⌊num_train / 200⌋ steps (no early stopping: the schedule
  spans them all) and returns the parameters of the epoch with the best validation NLL.
  """
  rng = np.random.default_rng(seed)
  train_x, train_c = sample_crescents(num_train, rng)
  test_x, test_c = sample_crescents(num_test, rng)
  validation_x, validation_c = sample_crescents(num_validation, rng)  # Last: train, test unchanged.
  model = make_model()
  params = model.init(jax.random.PRNGKey(seed), train_x[:2], train_c[:2])["params"]
  steps_per_epoch = num_train // BATCH_SIZE
  steps = epochs * steps_per_epoch
  schedule = optax.warmup_cosine_decay_schedule(0.0, 2e-3, min(500, steps // 10), steps)
  # As jax arrays: fit indexes them with traced permutations inside its jitted epoch.
  as_jax = lambda *arrays: tuple(jnp.asarray(array) for array in arrays)
  result = fr.fit(
    model,
    params,
    as_jax(train_x, train_c),
    as_jax(validation_x, validation_c),
    optimizer=optax.adam(schedule),
    batch_size=BATCH_SIZE,
    max_epochs=epochs,
    patience=epochs,
    seed=seed,
  )
  writer = metric_writers.create_default_writer(workdir)
  history = zip(result.history["train_nll"], result.history["validation_nll"], strict=True)
  for epoch, (train_nll, validation_nll) in enumerate(history, start=1):
    writer.write_scalars(
      epoch * steps_per_epoch, {"train/nll": train_nll, "validation/nll": validation_nll}
    )
  log_prob = np.asarray(model.apply({"params": result.params}, test_x, test_c, method="log_prob"))
  if not np.all(np.isfinite(log_prob)):
    raise FloatingPointError("The trained flow gives non-finite test log-likelihoods.")
  model_ll, model_se = evaluation.mean_and_two_standard_errors(log_prob)
  truth_ll, truth_se = evaluation.mean_and_two_standard_errors(true_log_prob(test_x, test_c))
  writer.write_scalars(steps, {"test/ll": model_ll, "test/true_ll": truth_ll})
  writer.flush()
  draw(model, result.params, os.path.join(workdir, "conditional.png"))
  print(
    f"test LL {model_ll:.3f} ± {model_se:.3f} nats (truth {truth_ll:.3f} ± {truth_se:.3f}), "
    f"best epoch {result.best_epoch} of {epochs}; picture: {os.path.join(workdir, 'conditional.png')}"
  )
  return {"test_ll": model_ll, "true_ll": truth_ll, "best_epoch": result.best_epoch}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]} (flags are --name=value).")
  if EPOCHS.value < 1:
    raise app.UsageError(f"--epochs must be >= 1, got {EPOCHS.value}.")
  # One batch to train on; a validation NLL; a test mean with its standard error.
  for flag, least in ((NUM_TRAIN, BATCH_SIZE), (NUM_VALIDATION, 1), (NUM_TEST, 2)):
    if flag.value < least:
      raise app.UsageError(f"--{flag.name} must be at least {least}, got {flag.value}.")
  os.makedirs(WORKDIR.value, exist_ok=True)
  train_and_evaluate(
    WORKDIR.value, EPOCHS.value, SEED.value, NUM_TRAIN.value, NUM_VALIDATION.value, NUM_TEST.value
  )


if __name__ == "__main__":
  app.run(main)
