"""The scaling benchmark end to end on a tiny grid (structure only, no timing assertions)."""

import csv
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.scaling import models
from experiments.scaling import report
from experiments.scaling import timing

WIDTHS = (4, 8)
BATCH = 3


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  config = timing.BenchmarkConfig(
    widths=WIDTHS, batch_sizes=(BATCH,), repetitions=1, min_repetition_s=0.0, fit_min_width=4
  )
  output_dir = tmp_path_factory.mktemp("scaling")
  measurements = timing.run_benchmark(config, log=lambda line: None)
  markdown = report.write_reports(measurements, config, output_dir)
  return measurements, markdown, output_dir


def test_every_method_and_point_is_measured(tiny_run):
  measurements, _, _ = tiny_run
  assert {(m.method, m.batch, m.width) for m in measurements} == {
    (method, BATCH, width) for method in models.METHODS for width in WIDTHS
  }
  for m in measurements:
    assert not m.skipped, m
    assert all(math.isfinite(t) and t > 0 for t in m.times_s), m
    assert m.memory_bytes is None or m.memory_bytes > 0


def test_every_step_trains_to_finite_changed_params(tiny_run):
  measurements, _, _ = tiny_run
  for m in measurements:
    assert m.params_finite and m.params_changed, m


def test_csv_has_one_ok_row_per_method_and_point(tiny_run):
  _, _, output_dir = tiny_run
  with open(output_dir / "scaling.csv") as file:
    rows = list(csv.DictReader(file))
  assert sorted((row["method"], int(row["width"])) for row in rows) == sorted(
    (method, width) for method in models.METHODS for width in WIDTHS
  )
  for row in rows:
    assert row["status"] == "ok" and int(row["batch"]) == BATCH
    assert float(row["min_s"]) > 0 and math.isfinite(float(row["median_s"]))
    assert float(row["min_s"]) <= float(row["median_s"]) <= float(row["max_s"])


def test_markdown_and_plot(tiny_run):
  _, markdown, output_dir = tiny_run
  assert (output_dir / "scaling.md").read_text() == markdown
  header = next(line for line in markdown.splitlines() if line.startswith("| B | D |"))
  for column in (
    *models.METHODS,
    "splines/relative",
    "naive/relative",
    "relative/plain",
    "lu/relative",
  ):
    assert f" {column} |" in header
  for width in WIDTHS:
    assert f"| {BATCH} | {width} | " in markdown
  assert jax.devices()[0].platform in markdown
  exponent_row = next(
    line
    for line in markdown.splitlines()
    if line.startswith(f"| {BATCH} | ") and line.count("|") == len(models.METHODS) + 2
  )
  assert "nan" not in exponent_row
  assert (output_dir / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_lu_layer_log_det_matches_slogdet_of_its_kernel():
  width = 5
  layer = models.LUDense(permutation_seed=1)
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  params = {
    "lower": jax.random.normal(keys[0], (width, width)),
    "upper": jax.random.normal(keys[1], (width, width)),
    "scale": jax.random.normal(keys[2], (width,)),
    "bias": jnp.zeros(width),
  }

  @jax.jit
  def kernel_and_log_det(params):
    kernel = layer.apply({"params": params}, jnp.eye(width))  # Rows e_i W: the kernel W.
    return kernel, layer.apply({"params": params}, method=models.LUDense.log_abs_det)

  kernel, log_det = kernel_and_log_det(params)
  np.testing.assert_allclose(
    log_det, np.linalg.slogdet(np.asarray(kernel, np.float64))[1], rtol=1e-4
  )


def test_fitted_exponent_recovers_power_law():
  points = [
    timing.Measurement("plain", 1, width, (1e-9 * width**2.5,), None) for width in (512, 1024, 4096)
  ]
  assert report.fitted_exponent(points, min_width=512) == pytest.approx(2.5)
