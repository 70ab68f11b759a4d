"""`python -m experiments.flowjax_benchmark` end to end on tfds mock data (tiny flows, budgets of
seconds), and its refusals before anything trains."""

import json

from absl import app
import numpy as np
import pytest
import tensorflow_datasets as tfds

pytest.importorskip("flowjax", reason="the benchmark extra: pip install -e '.[benchmark]'")

from experiments.flowjax_benchmark import __main__ as benchmark  # noqa: E402

TINY = [
  "--configs=test,test",
  "--maf_layers=1",
  "--maf_width=8",
  "--maf_knots=3",
  "--maf_batch_size=4",
  "--num_draws=2",
  "--repetitions=1",
  "--download",  # Under mock_data, tfds' download_and_prepare is a no-op.
]


def test_benchmark_runs_both_libraries_and_reports_each_budget(tmp_path, capsys):
  output = tmp_path / "report"
  with tfds.testing.mock_data(num_examples=16):
    benchmark.main(
      [
        "flowjax_benchmark",
        f"--workdir={tmp_path / 'runs'}",
        f"--output_dir={output}",
        "--budgets=0.01,0.02",
        *TINY,
      ]
    )
  record = json.loads((output / "flowjax_benchmark.json").read_text())
  runs, checkpoints = record["flax_relgrad"], record["flowjax"]["checkpoints"]
  assert [run["budget_minutes"] for run in runs] == [0.01, 0.02]
  assert all(np.isfinite(run["bpd"]) and run["steps"] == 8 for run in runs)  # 2 epochs of 4
  assert [checkpoint["mark_minutes"] for checkpoint in checkpoints] == [0.01, 0.02]
  assert all(c["minutes"] >= c["mark_minutes"] and np.isfinite(c["bpd"]) for c in checkpoints)
  assert checkpoints[0]["steps"] <= checkpoints[1]["steps"]
  assert record["draws_per_second"]["flax_relgrad"] > 0 < record["draws_per_second"]["flowjax"]
  table = (output / "flowjax_benchmark.md").read_text()
  # A run of seconds cannot fit in 0.6 s: the table says so instead of reporting it as a result.
  assert table.count("(over the budget)") == 2
  assert table in capsys.readouterr().out


def test_benchmark_refuses_a_used_workdir_and_unpaired_budgets_before_training(tmp_path):
  used = tmp_path / "runs" / "flax_relgrad_0.01min_test"
  used.mkdir(parents=True)
  (used / "config.json").write_text("{}")
  common = [f"--workdir={tmp_path / 'runs'}", f"--output_dir={tmp_path}", *TINY]
  with pytest.raises(app.UsageError, match="is not empty: a run there would resume"):
    benchmark.main(["flowjax_benchmark", "--budgets=0.01,0.02", *common])
  with pytest.raises(app.UsageError, match="pair each of distinct budgets with one config"):
    benchmark.main(["flowjax_benchmark", "--budgets=0.01", *common])
  with pytest.raises(app.UsageError, match="has no nonexistent.py"):
    benchmark.main(["flowjax_benchmark", "--budgets=1", "--configs=nonexistent", *common[:2]])
