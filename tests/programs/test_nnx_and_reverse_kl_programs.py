"""The NNX-vs-Linen step-time benchmark and the reverse-KL demo run end to end (tiny sizes), and
the benchmark programs take absl flags like the training programs."""

import pathlib

from absl import flags
import numpy as np
import pytest


def test_step_time_benchmark_runs(capsys):
  from experiments.scaling import nnx_vs_linen  # pylint: disable=g-import-not-at-top

  nnx_vs_linen.main(["nnx_vs_linen", "--width=4", "--batch_size=3", "--repetitions=1", "--steps=1"])
  output = capsys.readouterr().out
  assert "ratio nnx / linen = " in output and "ratio nnx_cached / linen = " in output


def test_spline_cost_benchmark_runs(capsys):
  from experiments.scaling import splines  # pylint: disable=g-import-not-at-top

  splines.main(
    [
      "splines",
      "--width=6",
      "--batch=3",
      "--num_layers=2",
      "--bins=3",
      "--repetitions=1",
      "--profile_calls=2",
    ]
  )
  timings, profile = capsys.readouterr().out.split("Kernels of one step by kind")
  rows = [line for line in timings.splitlines() if line.startswith("| ")]
  names = [row.split(" | ")[0].strip("| ") for row in rows[1:]]
  assert names == [
    "step without splines",
    "step with splines",
    "dense z W + b",
    "activation",
    "spline",
  ]
  assert all(float(row.split(" | ")[1]) > 0 for row in rows[1:])
  kinds = {
    row.split(" | ")[0].strip("| "): [float(cell) for cell in row.strip("| ").split(" | ")[1:]]
    for row in profile.splitlines()[4:]
  }
  # Both steps multiply matrices; only the one with splines gathers bin parameters.
  assert kinds["matrix product"][0] > 0 and kinds["matrix product"][2] > 0
  assert kinds["gather"][:2] == [0.0, 0.0] and kinds["gather"][2] > 0
  assert kinds["all"][2] > kinds["all"][0]


def test_kernel_kinds_of_a_compiled_module():
  """Every instruction of an optimised module gets a kind; a product, a gather and a reduction
  are named as such, and every traced kernel of a call is one of them."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from experiments.scaling import kernel_profile  # pylint: disable=g-import-not-at-top

  def f(a, b, index):
    return jnp.take(jnp.exp(a @ b), index).sum(0)

  args = (jnp.ones((8, 8)), jnp.ones((8, 8)), jnp.arange(5))
  compiled = jax.jit(f).lower(*args).compile()
  kinds = set(kernel_profile.kernel_kinds(compiled.as_text()).values())
  assert {"matrix product", "gather"} <= kinds and kinds & {"reduction", "elementwise"}
  profile = kernel_profile.profile_by_kind(lambda: compiled(*args), compiled.as_text(), calls=3)
  assert "matrix product" in profile
  assert all(count > 0 and seconds >= 0 for count, seconds in profile.values())
  with pytest.raises(RuntimeError, match="needs the CPU backend"):
    kernel_profile.profile_by_kind(lambda: compiled(*args), "HloModule empty", calls=1)


def test_reverse_kl_program_runs(tmp_path, capsys):
  from experiments.toy import reverse_kl  # pylint: disable=g-import-not-at-top

  flagfile = tmp_path / "reverse_kl.flags"  # absl's --flagfile, as every training program takes.
  flagfile.write_text("--steps=20\n--batch_size=64\n")
  reverse_kl.main(
    ["reverse_kl", f"--flagfile={flagfile}", f"--output={tmp_path / 'reverse_kl.png'}"]
  )
  output = capsys.readouterr().out
  kl = float(output.split("KL(q ‖ p) = ")[1].split()[0])
  assert np.isfinite(kl) and kl > 0 and "after 20 steps" in output
  assert (tmp_path / "reverse_kl.png").stat().st_size > 0


def test_programs_parse_their_own_flags_next_to_absl_global_ones():
  """Each program, imported, has its own FlagValues: its --steps or --repetitions is neither
  another's nor that of `experiments.training.throughput`, which defines them in absl's global
  flags."""
  # pylint: disable=g-import-not-at-top
  from experiments.scaling import __main__ as scaling
  from experiments.scaling import nnx_vs_linen
  from experiments.scaling import timing
  from experiments.toy import reverse_kl
  from experiments.training import throughput
  # pylint: enable=g-import-not-at-top

  assert throughput.FLAGS is flags.FLAGS and "steps" in flags.FLAGS
  assert reverse_kl.FLAGS["steps"].default == 5000 and nnx_vs_linen.FLAGS["steps"].default == 20
  config, output_dir = scaling.parse_flags(
    ["scaling", "--widths=4,8", "--batch_sizes=3", "--repetitions=2", "--output_dir=out"]
  )
  assert config == timing.BenchmarkConfig(widths=(4, 8), batch_sizes=(3,), repetitions=2)
  assert output_dir == pathlib.Path("out")
  with pytest.raises(
    flags.IllegalFlagValueError, match="must be positive integers, comma-separated"
  ):
    scaling.parse_flags(["scaling", "--widths=4,x"])
