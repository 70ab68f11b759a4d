"""The README's usage example runs as written."""

import pathlib
import re


def test_readme_usage_example_runs(capsys):
  readme = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
  example = re.search(r"```python\n(.*?)```", readme, re.DOTALL).group(1)
  exec(compile(example, "README.md", "exec"), {})  # pylint: disable=exec-used
  assert "mean log p(x) = " in capsys.readouterr().out
