"""The conditional 2-D demo: its exact density, and a short run end to end."""

import glob
import os

from absl import app
from absl import flags
from absl.testing import flagsaver
import numpy as np
import pytest

from experiments.toy import conditional


@pytest.mark.parametrize("context", [-1.0, 0.0, 0.7])
def test_true_density_integrates_to_one(context):
  axis = np.linspace(-8.0, 8.0, 801)
  grid = np.stack(np.meshgrid(axis, axis), axis=-1).reshape(-1, 2)
  density = np.exp(conditional.true_log_prob(grid, np.full((grid.shape[0], 1), context)))
  assert abs(density.sum() * (axis[1] - axis[0]) ** 2 - 1.0) < 1e-3


def test_samples_follow_the_true_density():
  """The sample mean of −log p equals the entropy, 1 + log 2π + log 0.4 for every c."""
  x, c = conditional.sample_crescents(200_000, np.random.default_rng(0))
  entropy = 1.0 + np.log(2 * np.pi) + np.log(0.4)
  assert abs(-conditional.true_log_prob(x, c).mean() - entropy) < 0.01


def test_short_run_writes_picture_events_and_a_plausible_likelihood(tmp_path, capsys):
  result = conditional.train_and_evaluate(  # 15 epochs of 20 steps.
    str(tmp_path), epochs=15, seed=0, num_train=4000, num_validation=1000, num_test=1000
  )
  assert os.path.getsize(tmp_path / "conditional.png") > 10_000
  assert glob.glob(str(tmp_path / "events.out.tfevents.*"))
  assert "test LL" in capsys.readouterr().out
  # Truth ≈ −1.92 nats; a standard normal base alone scores about −3.6 on these points.
  assert result["true_ll"] - 1.0 < result["test_ll"] < result["true_ll"] + 0.05


@pytest.mark.parametrize(
  "setting, message",
  [
    ({"epochs": 0}, "--epochs must be >= 1"),
    ({"num_train": 150}, "--num_train must be at least 200"),
    ({"num_test": 1}, "--num_test must be at least 2"),
  ],
)
def test_bad_flags_are_refused_before_any_work(tmp_path, setting, message):
  """Before, epochs=0 or fewer training pairs than a batch failed deep in optax's schedule."""
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  workdir = tmp_path / "run"
  with flagsaver.flagsaver(workdir=str(workdir), **setting):
    with pytest.raises(app.UsageError, match=message):
      conditional.main(["conditional"])
    with pytest.raises(app.UsageError, match=r"Unexpected arguments: \['epochs=5'\]"):
      conditional.main(["conditional", "epochs=5"])
  assert not workdir.exists()
