"""Every ```python block of the README runs as written (in a fresh namespace each)."""

import pathlib
import re

import pytest

from conftest import HAS_NNX

README = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
# Examples that load a trained run are run by tests/test_mnist.py on a mock-data run.
EXAMPLES = [
  example
  for example in re.findall(r"```python\n(.*?)```", README, re.DOTALL)
  if "load_run(" not in example
]
EXPECTED_OUTPUT = [
  "mean log p(x) = ",
  "best epoch ",
  "exact NLL ",
  "mean log p(x | c) = ",
  "bits/dim",
  "running mean 4.7",
  "relative_jacobian path: exact NLL ",
  "reverse KL(q ‖ p) ≈ ",
  "samples (2, 5, 8)",
  "ensemble kernel grads (4, 8, 8)",
]


def test_every_example_is_checked():
  assert len(EXAMPLES) == len(EXPECTED_OUTPUT)


@pytest.mark.parametrize("index", range(len(EXPECTED_OUTPUT)))
def test_readme_example_runs(capsys, index):
  if "flax_relgrad.nnx" in EXAMPLES[index] and not HAS_NNX:
    pytest.skip("flax_relgrad.nnx needs flax >= 0.12")
  exec(compile(EXAMPLES[index], f"README.md example {index + 1}", "exec"), {})  # pylint: disable=exec-used
  output = capsys.readouterr().out
  print(output)
  assert EXPECTED_OUTPUT[index] in output
