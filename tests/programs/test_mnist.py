"""End-to-end tests of `python -m experiments.mnist` on tfds mock data (no download)."""

import glob
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

from clu import periodic_actions
import jax
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from experiments import images
from experiments.mnist import importance
from experiments.mnist.configs import test as test_config
from experiments.training import checkpoints
from experiments.training import data
from experiments.training import loop
from experiments.training import parallel
from experiments.training import steps

NUM_MOCK_EXAMPLES = 16  # Per split: 4 steps of batch 4 per epoch.

# Work left behind by a run or a restore (Orbax's asynchronous saves, tensorstore reads that
# complete after their event loop closed) surfaces as an "unraisable" exception in whatever
# test runs at the time; every test here fails on one instead of passing with a warning.
pytestmark = [
  pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning"),
  pytest.mark.filterwarnings("error:coroutine .* was never awaited:RuntimeWarning"),
]


def mock_config(**overrides):
  config = test_config.get_config()
  config.download = True  # Under mock_data, download_and_prepare is a no-op.
  config.update(overrides)
  return config


def run(config, workdir):
  with tfds.testing.mock_data(num_examples=NUM_MOCK_EXAMPLES):
    return loop.train_and_evaluate(config, str(workdir))


def restore_latest(config, workdir):
  model, tx = steps.create_model(config), steps.create_optimizer(config, total_steps=1)
  abstract = steps.abstract_state(
    model, tx, 784, config.seed, parallel.DataParallel.over_all_devices(), config.ema_decay > 0
  )
  run_checkpoints = checkpoints.RunCheckpoints(str(workdir))
  try:
    return run_checkpoints.restore_latest(abstract)
  finally:
    run_checkpoints.close()


def event_tags(workdir):
  tags = set()
  for path in glob.glob(os.path.join(workdir, "events.out.tfevents.*")):
    for event in tf.compat.v1.train.summary_iterator(path):
      tags.update(value.tag for value in event.summary.value)
  return tags


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("uninterrupted")
  config = mock_config(checkpoint_every_steps=2)
  return config, workdir, run(config, workdir)


def test_end_to_end_writes_metrics_images_checkpoints(finished_run):
  config, workdir, test_metrics = finished_run
  assert np.isfinite(test_metrics["ll"]) and np.isfinite(test_metrics["bpd"])
  tags = event_tags(str(workdir))
  for tag in [
    "train/nll",
    "train/examples_per_sec",
    "steps_per_sec",
    "validation/ll",
    "validation/ll_2se",
    "validation/bpd",
    "test/ll",
    "test/bpd",
    "samples",
    "kernels/layers_0/condition",
    "kernels/layers_1/log_abs_det",
  ]:
    assert tag in tags, (tag, sorted(tags))
  assert os.path.getsize(os.path.join(workdir, "samples.png")) > 0
  state = restore_latest(config, workdir)
  assert int(state.step) == 2 * NUM_MOCK_EXAMPLES // config.batch_size
  with tfds.testing.mock_data(num_examples=NUM_MOCK_EXAMPLES):
    again = loop.evaluate_best(config, str(workdir))
  assert again == test_metrics


def test_resume_after_interruption_matches_uninterrupted_run(finished_run, tmp_path, monkeypatch):
  config, uninterrupted_dir, _ = finished_run
  original = data.prefetch_to_device
  chunks_seen = []

  def crash_after_three_chunks(chunks, size=2):
    for chunk in original(chunks, size):
      if len(chunks_seen) == 3:  # Steps 3, 4 (epoch end) and 7 are done and checkpointed.
        raise KeyboardInterrupt
      chunks_seen.append(chunk)
      yield chunk

  monkeypatch.setattr(data, "prefetch_to_device", crash_after_three_chunks)
  monkeypatch.chdir(tmp_path)  # A relative --workdir, as users type it.
  with pytest.raises(KeyboardInterrupt):
    run(config, "resumed")
  monkeypatch.setattr(data, "prefetch_to_device", original)
  assert int(restore_latest(config, tmp_path / "resumed").step) == 7
  run(config, "resumed")
  resumed = restore_latest(config, tmp_path / "resumed")
  uninterrupted = restore_latest(config, uninterrupted_dir)
  leaves = jax.tree_util.tree_leaves
  for a, b in zip(leaves(resumed.params), leaves(uninterrupted.params), strict=True):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_workdir_of_another_model_is_refused(finished_run):
  _, workdir, _ = finished_run
  recorded = (workdir / "config.json").read_text()
  with pytest.raises(ValueError, match="holds checkpoints of a different model"):
    run(mock_config(num_layers=3), workdir)
  # Other data (the noise's seed) or batches: refused too. A command that fails, also on
  # a bad value, leaves the workdir's record of its checkpoints as it was.
  for changed in ({"seed": 1}, {"batch_size": 2}):
    with pytest.raises(ValueError, match=f"different model or dataset.*'{next(iter(changed))}'"):
      run(mock_config(**changed), workdir)
  with pytest.raises(ValueError, match="kernel_init='bogus'"):
    run(mock_config(kernel_init="bogus"), workdir)
  assert (workdir / "config.json").read_text() == recorded


def test_evaluation_refuses_another_model_or_data_and_an_untrained_workdir(finished_run, tmp_path):
  """--mode=evaluate and --mode=layers score the workdir's checkpoint only with the model and
  data it was trained with; the same config reproduces the training's test number."""
  config, workdir, test_metrics = finished_run
  with tfds.testing.mock_data(num_examples=NUM_MOCK_EXAMPLES):
    assert loop.evaluate_best(config, str(workdir))["ll"] == pytest.approx(test_metrics["ll"])
    for changed in ({"alpha": 0.3}, {"seed": 2}, {"test_split": "test[:2]"}):
      with pytest.raises(ValueError, match="different model or dataset"):
        loop.evaluate_best(mock_config(**changed), str(workdir))
    with pytest.raises(ValueError, match="different model or dataset"):
      loop.report_layers(mock_config(alpha=0.3), str(workdir))
    missing = tmp_path / "misspelled"
    with pytest.raises(FileNotFoundError, match="No best checkpoint"):
      loop.evaluate_best(config, str(missing))
    assert not missing.exists()


def test_workdir_of_another_spline_placement_is_refused(tmp_path):
  """A config.json without `spline_placement` (written before it existed) had a spline before
  every layer; without bins the placement does not change the model."""
  splines = mock_config(spline_bins=4)
  saved = json.loads(splines.to_json())
  del saved["spline_placement"]
  (tmp_path / "config.json").write_text(json.dumps(saved))
  with pytest.raises(ValueError, match="'spline_placement': \\('every_layer', 'input'\\)"):
    checkpoints.check_config(mock_config(spline_bins=4, spline_placement="input"), str(tmp_path))
  checkpoints.check_config(splines, str(tmp_path))
  no_splines = tmp_path / "no_splines"
  no_splines.mkdir()
  checkpoints.record_config(mock_config(), str(no_splines))
  checkpoints.check_config(mock_config(spline_placement="input"), str(no_splines))


def test_ema_step_follows_the_warmed_up_average():
  """e_0 = p_0, e_{t+1} = β_t e_t + (1 − β_t) p_{t+1}, β_t = min(decay, (1 + t)/(10 + t)), in
  float64 against the state the jitted step keeps."""
  config = mock_config(num_layers=2, learning_rate=0.05)
  model, tx = steps.create_model(config), steps.create_optimizer(config, total_steps=5)
  state = steps.initial_state(model, tx, 3, seed=0, ema=True)
  step = jax.jit(steps.make_train_step(model, tx, ema_decay=0.5))
  batch = jax.random.normal(jax.random.PRNGKey(1), (8, 3))
  as64 = lambda tree: [np.asarray(leaf, np.float64) for leaf in jax.tree_util.tree_leaves(tree)]
  expected = as64(state.params)
  for t in range(4):
    state = step(state, batch)
    beta = min(0.5, (1 + t) / (10 + t))
    expected = [
      beta * e + (1 - beta) * p for e, p in zip(expected, as64(state.params), strict=True)
    ]
  for got, want in zip(as64(state.ema_params), expected, strict=True):
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
  assert not np.allclose(as64(state.ema_params)[0], as64(state.params)[0])


def test_ema_run_keeps_the_average_as_best_and_resumes_exactly(tmp_path):
  """With ema_decay the best checkpoint holds the averaged params (evaluated, tested), the
  average survives a restart exactly, and turning it off on the same workdir is refused."""
  uninterrupted = run(mock_config(ema_decay=0.9), tmp_path / "uninterrupted")
  run(mock_config(ema_decay=0.9, num_epochs=1), tmp_path / "resumed")
  first_epoch = restore_latest(mock_config(ema_decay=0.9), tmp_path / "resumed")
  run_checkpoints = checkpoints.RunCheckpoints(str(tmp_path / "resumed"))
  try:
    best_step, best = run_checkpoints.restore_best_params(first_epoch.params)
  finally:
    run_checkpoints.close()
  assert best_step == 4  # One epoch, one evaluation.
  leaves = jax.tree_util.tree_leaves
  for a, b in zip(leaves(best), leaves(first_epoch.ema_params), strict=True):
    np.testing.assert_array_equal(a, b)
  assert run(mock_config(ema_decay=0.9), tmp_path / "resumed") == uninterrupted
  with pytest.raises(ValueError, match="ema_decay"):
    run(mock_config(), tmp_path / "resumed")


def test_corrupt_checkpoint_gives_clear_error(finished_run, tmp_path):
  config, workdir, _ = finished_run
  copy = tmp_path / "copy"
  shutil.copytree(workdir, copy)
  for path in glob.glob(str(copy / "checkpoints" / "best" / "*" / "default" / "d" / "*")):
    with open(path, "wb") as file:
      file.write(b"garbage")
  with tfds.testing.mock_data(num_examples=NUM_MOCK_EXAMPLES):
    with pytest.raises(ValueError, match="Cannot restore the checkpoint"):
      loop.evaluate_best(config, str(copy))


def test_nonfinite_loss_stops_with_the_step_and_keeps_last_good_checkpoint(tmp_path):
  config = mock_config(
    learning_rate=1e8, checkpoint_every_steps=1, log_every_steps=1, steps_per_call=1
  )
  with pytest.raises(
    FloatingPointError, match=r"Training diverged: .*non-finite at step (\d+)"
  ) as error:
    run(config, tmp_path)
  bad_step = int(re.search(r"non-finite at step (\d+)", str(error.value)).group(1))
  state = restore_latest(config, tmp_path)
  assert int(state.step) == bad_step - 1
  assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree_util.tree_leaves(state.params))


def test_missing_dataset_names_the_fix(tmp_path):
  config = test_config.get_config()
  config.data_dir = str(tmp_path)
  with pytest.raises(data.DatasetNotFoundError, match="manual_dir"):
    images.load_splits(config)
  config.dataset = "mnistt"
  with pytest.raises(data.DatasetNotFoundError, match="no dataset named 'mnistt'"):
    images.load_splits(config)


def test_wrong_image_shape_is_refused():
  with tfds.testing.mock_data(num_examples=4):
    with pytest.raises(
      ValueError, match=r"shape \(28, 28, 1\), but config.image_shape is \(32, 32, 3\)"
    ):
      images.load_splits(mock_config(image_shape=(32, 32, 3)))


def test_command_line_config_typo_is_refused(tmp_path):
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "experiments.mnist",
      f"--workdir={tmp_path}",
      "--config.learnin_rate=1e-3",
    ],
    capture_output=True,
    text=True,
    timeout=120,
    check=False,
  )
  assert result.returncode != 0
  assert "learnin_rate" in result.stderr


@pytest.mark.parametrize(
  "field, value, message",
  [
    ("batch_size", 0, "batch_size must be a positive integer"),
    ("lam", 0.5, r"lam must lie in \(0, 0.5\)"),
    ("on_divergence", "ignore", "on_divergence='ignore' is not one of"),
    ("kernel_init", "xavier", "kernel_init='xavier' is not one of"),
    ("data_source", "video", "data_source='video' is not one of"),
    ("ema_decay", 1.0, r"ema_decay must lie in \[0, 1\)"),
    ("patience", 0, "patience must be a positive integer"),
    ("seed", -1, "seed must be >= 0"),
    ("final_lr_fraction", 50.0, r"final_lr_fraction must lie in \[0, 1\]"),
    ("learning_rate", float("inf"), "learning_rate must be positive and finite"),
    ("checkpoint_every_steps", 3, "checkpoint_every_steps must be 0 or a multiple of"),
  ],
)
def test_config_values_out_of_range_are_refused(field, value, message, tmp_path):
  with pytest.raises(ValueError, match=message):
    run(mock_config(**{field: value}), tmp_path)


class ReportProgressAtEveryCall(periodic_actions.ReportProgress):
  """CLU's ReportProgress reporting steps_per_sec at every call instead of once a minute."""

  def __init__(self, **kwargs):
    super().__init__(**{**kwargs, "every_secs": 0.0})


def scalar_values(workdir, tag):
  values = []
  for path in glob.glob(os.path.join(workdir, "events.out.tfevents.*")):
    for event in tf.compat.v1.train.summary_iterator(path):
      values += [
        float(tf.make_ndarray(value.tensor)) for value in event.summary.value if value.tag == tag
      ]
  return values


def test_divergence_restores_last_good_state_with_lower_learning_rate(tmp_path, monkeypatch):
  """lr 1e8 makes step 2's loss non-finite, which condemns the parameters of step 1: "restore"
  restarts from the initial state with the learning rate scaled to 1e8·1e-12 (at 1e8·1e-10
  the mean training NLL rises by thousands of nats in a step: a divergence too). The step rate
  is measured afresh after the restore (not from step 2 back to step 1: a negative rate)."""
  config = mock_config(
    learning_rate=1e8,
    checkpoint_every_steps=1,
    log_every_steps=1,
    steps_per_call=1,
    on_divergence="restore",
    divergence_lr_factor=1e-12,
    max_divergences=1,
  )
  monkeypatch.setattr(periodic_actions, "ReportProgress", ReportProgressAtEveryCall)
  test_metrics = run(config, tmp_path)
  assert np.isfinite(test_metrics["ll"])
  state = restore_latest(config, tmp_path)
  assert int(state.divergences) == 1 and steps.learning_rate_scale(state) == pytest.approx(1e-12)
  assert int(state.step) == 2 * NUM_MOCK_EXAMPLES // config.batch_size
  assert {"train/divergences", "train/learning_rate_scale"} <= event_tags(str(tmp_path))
  steps_per_sec = scalar_values(str(tmp_path), "steps_per_sec")
  assert len(steps_per_sec) >= 6 and min(steps_per_sec) > 0, steps_per_sec


def test_divergence_gives_up_after_max_divergences(tmp_path):
  config = mock_config(
    learning_rate=1e8,
    checkpoint_every_steps=1,
    log_every_steps=1,
    steps_per_call=1,
    on_divergence="restore",
    max_divergences=2,
  )
  with pytest.raises(FloatingPointError, match="Training diverged"):
    run(config, tmp_path)
  assert int(restore_latest(config, tmp_path).step) == 1


def test_exploding_loss_is_a_divergence(finished_run):
  config, workdir, _ = finished_run
  config = mock_config(divergence_nats=50.0)
  with tfds.testing.mock_data(num_examples=NUM_MOCK_EXAMPLES):
    run_ = loop.Run(config, str(workdir), data.load_source(config))
  state = restore_latest(config, workdir).replace(lowest_train_nll=np.float32(1000.0))
  assert run_._divergence(state, 1049.0, 2, 4) is None  # pylint: disable=protected-access
  reason, good_step = run_._divergence(state, 1051.0, 2, 4)  # pylint: disable=protected-access
  assert (
    "more than divergence_nats=50.0 above the lowest so far (1000)" in reason and good_step == 1
  )


def test_learning_rate_schedules():
  config = mock_config(
    learning_rate=1e-3, warmup_steps=10, lr_schedule="cosine", final_lr_fraction=0.1
  )
  schedule = steps.learning_rate_schedule(config, total_steps=110)
  np.testing.assert_allclose(
    [schedule(0), schedule(5), schedule(10), schedule(110)], [0, 5e-4, 1e-3, 1e-4], rtol=1e-5
  )
  config.lr_schedule = "constant"
  schedule = steps.learning_rate_schedule(config, total_steps=110)
  np.testing.assert_allclose(
    [schedule(5), schedule(10), schedule(100)], [5e-4, 1e-3, 1e-3], rtol=1e-5
  )
  config.lr_schedule = "linear"
  with pytest.raises(ValueError, match="lr_schedule='linear'"):
    steps.learning_rate_schedule(config, total_steps=110)


def test_divergence_detection_is_on_by_default_and_catches_an_explosion_from_the_start(tmp_path):
  """lr 10 blows the loss up within the first logged window (on real MNIST: to 1e15 nats): the
  default divergence_nats, measured against the initial parameters' validation NLL, stops it."""
  assert test_config.get_config().divergence_nats > 0
  message = r"Training diverged: the mean training NLL of steps 1-3 is .*above the lowest so far \(2245.97\)"
  with pytest.raises(FloatingPointError, match=message):
    run(mock_config(learning_rate=10.0), tmp_path)


def corrupt_array_data(step_dir):
  """Flips 8 bytes in the middle of every OCDBT data file (the arrays' bytes) of a checkpoint."""
  paths = glob.glob(os.path.join(step_dir, "default", "**", "d", "*"), recursive=True)
  assert paths
  for path in paths:
    with open(path, "r+b") as file:
      data_bytes = bytearray(file.read())
      middle = len(data_bytes) // 2
      data_bytes[middle : middle + 8] = bytes(b ^ 0xFF for b in data_bytes[middle : middle + 8])
      file.seek(0)
      file.write(data_bytes)


def file_contents(folder):
  """{path relative to `folder`: bytes} of every file under `folder`."""
  paths = glob.glob(os.path.join(folder, "**"), recursive=True)
  return {
    os.path.relpath(path, folder): pathlib.Path(path).read_bytes()
    for path in paths
    if os.path.isfile(path)
  }


def test_corrupt_newest_checkpoint_is_moved_aside_and_the_run_resumes_from_the_older_one(
  finished_run, tmp_path, caplog
):
  config, workdir, _ = finished_run
  copy = tmp_path / "copy"
  shutil.copytree(workdir, copy)
  latest, unreadable = (
    copy / "checkpoints" / "latest",
    copy / "checkpoints" / checkpoints.UNREADABLE_DIR,
  )
  assert sorted(int(step) for step in os.listdir(latest)) == [7, 8]
  corrupt_array_data(latest / "8")
  corrupt_files = file_contents(latest / "8")
  with caplog.at_level("INFO"):
    run(config, copy)
  assert "Cannot restore the checkpoint at step 8" in caplog.text
  assert f"moved the unreadable checkpoints of steps [8] to {unreadable / '8'}" in caplog.text
  assert "Resumed from step 7." in caplog.text
  assert "could not be restored" not in caplog.text  # Orbax's own warning.
  assert file_contents(unreadable / "8") == corrupt_files  # Kept, byte for byte, for inspection.
  assert sorted(os.listdir(latest)) == ["7", "8"]  # Step 8 trained and saved again.
  corrupt_array_data(latest / "8")  # Again: the first unreadable step 8 keeps its place.
  assert int(restore_latest(config, copy).step) == 7
  assert sorted(os.listdir(unreadable)) == ["8", "8.1"] and sorted(os.listdir(latest)) == ["7"]
  corrupt_array_data(latest / "7")
  with pytest.raises(
    ValueError, match=r"None of the checkpoints .* \(steps \[7\]\) can be restored"
  ):
    restore_latest(config, copy)
  assert sorted(os.listdir(latest)) == ["7"]  # Nothing is moved when nothing is readable.


def test_readme_load_run_example_on_a_finished_run(finished_run, tmp_path, monkeypatch, capsys):
  """The README's notebook snippet, run as written against a mock-data run at runs/mnist."""
  readme = open(os.path.join(os.path.dirname(__file__), "..", "..", "README.md")).read()
  (example,) = [
    e for e in re.findall(r"```python\n(.*?)```", readme, re.DOTALL) if "load_run(" in e
  ]
  _, workdir, metrics = finished_run
  os.makedirs(tmp_path / "runs")
  os.symlink(workdir, tmp_path / "runs" / "mnist")
  monkeypatch.chdir(tmp_path)
  exec(compile(example, "README.md load_run example", "exec"), {})  # pylint: disable=exec-used
  assert f"best step {metrics['step']}: " in capsys.readouterr().out


def test_load_run_reproduces_the_test_likelihood(finished_run):
  from experiments.training.runs import load_run  # pylint: disable=g-import-not-at-top

  config, workdir, metrics = finished_run
  run = load_run(str(workdir))
  assert run.step == metrics["step"] and json.loads(run.config.to_json()) == json.loads(
    config.to_json()
  )
  with tfds.testing.mock_data(num_examples=NUM_MOCK_EXAMPLES):
    source = data.load_source(config)
  test_y = np.asarray(data.eval_array(source, source.splits.test, config.seed, data.TEST_NOISE))
  log_p = run.model.apply({"params": run.params}, test_y, method="log_prob")
  np.testing.assert_allclose(float(log_p.mean()), metrics["ll"], rtol=1e-5)
  with pytest.raises(FileNotFoundError, match="is not the --workdir of a training run"):
    load_run(str(workdir / "nowhere"))


@pytest.mark.parametrize("placement", ["every_layer", "input"])
def test_layer_report_terms_add_up_to_the_log_likelihood(placement):
  """With splines, on random parameters: the per-layer terms and log N(z) sum to log p;
  `config.spline_placement` puts a spline before every layer or on the input only."""
  from experiments.training import layer_report  # pylint: disable=g-import-not-at-top

  model = steps.create_model(
    mock_config(num_layers=3, spline_bins=4, spline_bound=3.0, spline_placement=placement)
  )
  x = jax.random.normal(jax.random.PRNGKey(0), (50, 6))
  params = model.init(jax.random.PRNGKey(1), x)["params"]
  params = jax.tree_util.tree_map(
    lambda p: p + 0.2 * jax.random.normal(jax.random.PRNGKey(2), p.shape), params
  )
  rows, base, _ = layer_report.layer_report(model, params, x)
  total = base + sum(r.spline_log_det + r.kernel_log_abs_det + r.activation_log_det for r in rows)
  log_p = model.apply({"params": params}, x, method="log_prob")
  np.testing.assert_allclose(total, float(log_p.mean()), rtol=1e-5)
  assert len(rows) == 3 and rows[-1].activation_log_det == 0.0
  assert [r.spline_log_det != 0.0 for r in rows] == [True] + 2 * [placement == "every_layer"]
  assert all(r.condition >= 1.0 for r in rows)


def test_layers_mode_reports_the_best_checkpoint(finished_run):
  config, workdir, metrics = finished_run
  with tfds.testing.mock_data(num_examples=NUM_MOCK_EXAMPLES):
    report = loop.report_layers(config, str(workdir))
  assert f"best checkpoint (step {metrics['step']})" in report
  assert len(report.splitlines()) == 2 + config.num_layers + 2
  assert "a learned elementwise base could add about" in report


def test_elementwise_base_gain_estimates_the_marginals_kl_to_the_standard_normal():
  """Held out, per coordinate: about 0 for N(0, 1) marginals, KL(N(0, 4) ‖ N(0, 1)) =
  3/2 − log 2 for N(0, 4), and below the exact 0.1765 but clearly positive for a unit-variance
  uniform (the kernel estimate rounds its edges off)."""
  from experiments.training import layer_report  # pylint: disable=g-import-not-at-top

  normal = jax.random.normal(jax.random.PRNGKey(0), (4000, 3))
  uniform = jax.random.uniform(jax.random.PRNGKey(1), (4000, 3), minval=-(3**0.5), maxval=3**0.5)
  per_coordinate = lambda z: float(layer_report.elementwise_base_gain(z)) / 3
  assert abs(per_coordinate(normal)) < 0.01
  assert abs(per_coordinate(2.0 * normal) - (1.5 - np.log(2.0))) < 0.02
  assert 0.08 < per_coordinate(uniform) < 0.1765
  with pytest.raises(ValueError, match="at least 4"):
    layer_report.elementwise_base_gain(normal[:3])


def test_dequantisation_bounds_of_a_finished_run(finished_run):
  """`python -m experiments.mnist.importance`: per test image, the importance-weighted bound
  is at most the single-draw bound (bits/dim; Jensen), equal to it at one draw."""
  _, workdir, metrics = finished_run
  with tfds.testing.mock_data(num_examples=NUM_MOCK_EXAMPLES):
    run, bounds = importance.dequantisation_bounds(str(workdir), num_draws=8, num_images=10)
    _, one_draw = importance.dequantisation_bounds(str(workdir), num_draws=1, num_images=10)
  assert run.step == metrics["step"]
  assert bounds["single"].shape == bounds["weighted"].shape == (10,)
  assert np.all(bounds["weighted"] <= bounds["single"]) and np.all(np.isfinite(bounds["weighted"]))
  np.testing.assert_allclose(one_draw["weighted"], one_draw["single"], rtol=1e-12)
  report = importance.describe(str(workdir), run, bounds, 8)
  assert "10 test images, K = 8" in report and "difference:" in report


def test_dequantisation_bounds_refuse_bad_arguments(finished_run):
  _, workdir, _ = finished_run
  with pytest.raises(ValueError, match="num_draws and num_images must be >= 1"):
    importance.dequantisation_bounds(str(workdir), num_draws=0, num_images=10)
