"""The NNX-vs-Linen step-time benchmark and the reverse-KL demo run end to end (tiny sizes)."""

import numpy as np


def test_step_time_benchmark_runs(capsys):
  from experiments.scaling import nnx_vs_linen  # pylint: disable=g-import-not-at-top

  nnx_vs_linen.main(["--width=4", "--batch_size=3", "--repetitions=1", "--steps=1"])
  output = capsys.readouterr().out
  assert "ratio nnx / linen = " in output and "ratio nnx_cached / linen = " in output


def test_reverse_kl_program_runs(tmp_path, capsys):
  from experiments.toy import reverse_kl  # pylint: disable=g-import-not-at-top

  reverse_kl.main(["--steps=20", "--batch_size=64", f"--output={tmp_path / 'reverse_kl.png'}"])
  kl = float(capsys.readouterr().out.split("KL(q ‖ p) = ")[1].split()[0])
  assert np.isfinite(kl) and kl > 0
  assert (tmp_path / "reverse_kl.png").stat().st_size > 0
